"""ONNX export: every registered arch in both flavours with parity, in-graph crops == host crops."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from nexedge import preprocess as pp  # noqa: E402
from nexedge.card import CardError, ModelCard, load_card  # noqa: E402
from nexedge.export.graph import InGraphModel  # noqa: E402
from nexedge.export.onnx_export import export_onnx  # noqa: E402
from nexedge.export.toy import CLASSES, toy_images, train_toy_checkpoint, write_toy_dataset  # noqa: E402
from nexedge.models import list_models  # noqa: E402
from nexedge.runtime import open_backend  # noqa: E402
from tests.support.shared import untrained_checkpoint  # noqa: E402

torch.set_num_threads(1)
INP = {"color": "gray", "resize": [40, 44], "crop": [32, 36], "crop_mode": "ten"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("exp")
    return train_toy_checkpoint(str(d / "toy.pt"), inp=dict(INP), steps=30)


def _arch_cases():
    # VGG19's 100M-parameter classifier makes each export ~30 s on 2 cores: marked slow.
    for arch in list_models():
        marks = [pytest.mark.slow] if arch.startswith("vgg") else []
        for crops in ("host", "ten"):
            yield pytest.param(arch, crops, marks=marks, id=f"{arch}-{crops}")


@pytest.mark.parametrize("arch,crops", list(_arch_cases()))
def test_export_every_arch_both_flavours_with_parity(untrained_export, arch, crops):
    """``untrained_export`` (tests/conftest.py): export_onnx(ckpt, crops=crops, parity_images=3), once
    per run (test_trt_compat lints the same files), at the smallest input every arch takes."""
    got = untrained_export(arch, crops)
    ckpt, path = got["checkpoint"], got["fp32"]
    in_type, outs = (1, ["logits"]) if crops == "host" else (2, ["probs", "defect_score", "logits"])
    card = load_card(path)
    parity = card.data["provenance"]["export"]["parity"]  # what export_onnx returned
    assert parity["max_abs_diff"] <= 1e-4 and parity["n_images"] == 3
    proto = onnx.load(path)
    assert proto.opset_import[0].version == 17
    inp = proto.graph.input[0].type.tensor_type
    assert inp.elem_type == in_type  # 1 = FLOAT, 2 = UINT8
    assert inp.shape.dim[0].dim_param == "batch"
    assert [o.name for o in proto.graph.output] == outs
    assert card.graph["crops"] == crops and card.data["parent"]["sha256"] == load_card(ckpt).sha256
    assert card.data["provenance"]["export"]["arch"] == arch
    # TensorRT 8.5/8.6/10 parser rules (`nexedge check-onnx`); the full matrix is in test_trt_compat.
    from nexedge.export import onnx_check as oc

    for target in oc.TARGETS:
        assert not oc.errors(oc.check_onnx(proto, target)), oc.format_findings(path, target,
                                                                                oc.check_onnx(proto, target))
    assert card.data["provenance"]["export"]["tensorrt_check"] == {t: "ok" for t in oc.TARGETS}


def test_ingraph_crops_equal_host_batch_exactly():
    """The wrapper feeds the backbone exactly the crops preprocess.host_batch makes."""
    seen = []

    class Record(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return x.mean(dim=(2, 3))

    inp = ModelCard.new(CLASSES, resize=(21, 24), crop=(16, 17), color="gray").input
    imgs = np.random.default_rng(1).integers(0, 256, (3, 21, 24, 1), dtype=np.uint8)
    for mode in ("center", "five", "ten"):
        seen.clear()
        InGraphModel(Record(), inp, mode, 0)(torch.from_numpy(imgs))
        np.testing.assert_array_equal(seen[0].numpy(), pp.host_batch(imgs, inp, mode))


@pytest.mark.parametrize("color", ["gray", "rgb"])
def test_ingraph_tencrop_equals_host_tencrop_onnx(tmp_path, color):
    inp = dict(INP, color=color)
    ckpt = train_toy_checkpoint(str(tmp_path / "m.pt"), inp=inp, steps=5)
    data = write_toy_dataset(str(tmp_path / "data"), load_card(ckpt).input, {"val": 9})
    host = export_onnx(ckpt, crops="host", parity_data=data, parity_images=9, threads=1)
    ten = export_onnx(ckpt, crops="ten", parity_data=data, parity_images=9, threads=1)
    assert host.parity["source"].endswith(":9")
    imgs, _ = toy_images(7, load_card(ckpt).input, seed=3)
    with open_backend(host.path) as a, open_backend(ten.path) as b:
        assert a.crop_mode == "ten" and b.crops == "ten"
        ra, rb = a.infer(imgs), b.infer(imgs)
    np.testing.assert_allclose(ra.probs, rb.probs, atol=1e-5)
    np.testing.assert_allclose(ra.defect_score, rb.defect_score, atol=1e-5)


def test_export_parity_failure_writes_nothing(tmp_path, trained):
    out = tmp_path / "x.onnx"
    with pytest.raises(RuntimeError, match="parity check failed"):
        export_onnx(trained, out=str(out), crops="ten", tolerance=-1.0, parity_images=2, threads=1)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_tampered_checkpoint(tmp_path):
    ckpt = untrained_checkpoint(str(tmp_path / "m.pt"), "tiny", size=32, crop=28)
    with open(ckpt, "ab") as f:
        f.write(b"tamper")
    with pytest.raises(CardError, match="artifact.sha256"):
        export_onnx(ckpt, crops="host")


def test_onnx_backend_refuses_tampered_onnx(tmp_path, trained):
    res = export_onnx(trained, out=str(tmp_path / "m.onnx"), crops="center", parity_images=2, threads=1)
    data = bytearray(open(res.path, "rb").read())
    data[-1] ^= 1
    open(res.path, "wb").write(bytes(data))
    with pytest.raises(CardError, match="artifact.sha256"):
        open_backend(res.path)


def test_export_bad_arguments_name_the_value(trained):
    with pytest.raises(ValueError, match="unknown --crops 'eleven'"):
        export_onnx(trained, crops="eleven")
    with pytest.raises(ValueError, match="--max-batch"):
        export_onnx(trained, crops="host", max_batch=0)


def test_cli_export(tmp_path, trained, capsys):
    from nexedge.cli import main

    out = tmp_path / "cli.onnx"
    assert main(["export", trained, "--crops", "five", "-o", str(out), "--parity-images", "2",
                 "--max-batch", "8"]) == 0
    card = load_card(str(out))
    assert card.graph == {"crops": "five", "input_name": "images", "output_names": ["probs", "defect_score", "logits"],
                          "max_batch": 8}
    assert "parity" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "missing.pt")]) == 1


def test_parity_uses_the_trainers_data_root(tmp_path):
    ckpt = train_toy_checkpoint(str(tmp_path / "m.pt"), inp=dict(INP), steps=2)
    data = write_toy_dataset(str(tmp_path / "data"), load_card(ckpt).input, {"val": 6})
    card = load_card(ckpt)
    card.data["provenance"]["data_root"] = data  # what nexedge train records
    card.save_for(ckpt)
    res = export_onnx(ckpt, crops="center", parity_images=4, threads=1)
    assert res.parity["source"] == f"{data}:4"
