"""Every registered architecture: forward shapes and ONNX export (opset 17, TorchScript exporter)."""

import io
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

import torch.nn.functional as F  # noqa: E402

import nexedge.models as models  # noqa: E402
from nexedge.models import accepts, arch_specs, create_model, list_models  # noqa: E402
from nexedge.models.stn import SpatialTransformer, affine_grid  # noqa: E402
from nexedge.models.zoo import ExportableAdaptiveAvgPool2d  # noqa: E402

#: The report's architectures (they must stay); every test of "each architecture" reads the registry.
REPORT = ["resnet18", "resnet34", "resnet50", "resnet18_stn", "resnet34_stn", "resnet50_stn", "resnet18_att2", "tiny",
          "small_max", "vgg19_bn", "vgg19_bn_stn"]


def _build(name, n=3, size=64, **kw):
    kw.update(accepts(name, {"input_size": (size, size)}))
    return create_model(name, n, **kw).eval()


def _every_arch():
    # VGG19's 100M-parameter classifier makes each export ~30 s on 2 cores: marked slow.
    for name in list_models():
        yield pytest.param(name, marks=[pytest.mark.slow] if name.startswith("vgg") else [], id=name)


def _export_and_compare(model, size=64):
    import onnxruntime as ort

    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(x).numpy()
    buf = io.BytesIO()
    torch.onnx.export(model, x[:1], buf, dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-4)
    return out


def test_registry_has_the_report_archs():
    names = set(list_models())
    assert set(REPORT) <= names


@pytest.mark.parametrize("name", list(_every_arch()))
def test_forward_shape_and_onnx_export(name):
    model = _build(name, n=5)
    out = _export_and_compare(model)
    assert out.shape == (2, 5)


def test_every_module_in_the_archs_package_is_discovered_and_declares_what_it_builds():
    """No hand-kept list: the modules of nexedge/models/archs/ are the registry, each spec complete."""
    import pkgutil

    import nexedge.models.archs as pkg

    modules = {f"nexedge.models.archs.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)}
    specs = arch_specs()
    assert {s.module for s in specs.values()} == modules
    for name, spec in specs.items():
        assert spec.summary and spec.family, name
        assert len(spec.mean) == len(spec.std) == 3 and min(spec.std) > 0, name
        assert spec.crop[0] <= spec.resize[0] and spec.crop[1] <= spec.resize[1], name
        assert callable(models.factory_of(name)), name
        assert ("input_size" in accepts(name, {"input_size": 1})) or not spec.needs_input_size, name


def test_listing_imports_no_torch_and_survives_a_module_with_a_missing_package(tmp_path, monkeypatch):
    import subprocess
    import sys

    code = ("import sys, nexedge.models as m; m.arch_specs(); import nexedge.cli as c; c.build_parser(); "
            "print('torch' in sys.modules, 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
    pkg = tmp_path / "altarchs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "needs_timm.py").write_text("import no_such_package_here\n")
    (pkg / "mine.py").write_text("from nexedge.models import ArchSpec\n"
                                 "ARCHS = (ArchSpec('mine', 'mine', 'a test arch', 'mine_nets:build'),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found, skipped = models.discover("altarchs")
    assert list(found) == ["mine"] and found["mine"].module == "altarchs.mine"
    assert "no_such_package_here" in skipped["altarchs.needs_timm"]
    (pkg / "bad.py").write_text("X = 1\n")
    with pytest.raises(ValueError, match=r"altarchs.bad: an architecture module must declare ARCHS"):
        models.discover("altarchs")


def test_generated_arch_help_and_choices_name_every_architecture():
    from nexedge.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command in ("train", "demo"):
        arch = next(a for a in sub.choices[command]._actions if a.dest == "arch")
        assert list(arch.choices) == list_models(), command
        for name in list_models():
            assert re.search(rf"\b{name}\b", arch.help), (command, name)
    assert "resnet18 (default)" in next(a for a in sub.choices["train"]._actions if a.dest == "arch").help


def test_bad_pretrained_fails_naming_the_value_the_arch_and_its_weights(tmp_path, capsys):
    from nexedge.cli import main

    with pytest.raises(ValueError, match=r"--pretrained 'imagenet': tiny has no pretrained weights; expected none"):
        create_model("tiny", 3, pretrained="imagenet")
    rc = main(["train", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "o"), "--arch", "resnet18",
               "--pretrained", "imagnet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "--pretrained 'imagnet': resnet18 has imagenet weights; expected none, imagenet (torchvision" in err
    assert "PATH to a state dict" in err
    with pytest.raises(SystemExit):
        main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--arch", "resnet9"])
    assert "invalid choice: 'resnet9'" in capsys.readouterr().err


def test_register_keeps_its_signature_for_runtime_architectures():
    @models.register("test_runtime_arch", mean=(0.1, 0.2, 0.3), std=(1, 1, 1))
    def build(num_classes, pretrained="none", width=4):
        return torch.nn.Linear(width, num_classes)

    try:
        assert "test_runtime_arch" in list_models()
        assert models.input_normalization("test_runtime_arch") == ((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
        assert create_model("test_runtime_arch", 3, width=5).weight.shape == (3, 5)
        with pytest.raises(ValueError, match="registered twice"):
            models.register("tiny")(build)
    finally:
        models._RUNTIME.pop("test_runtime_arch")


def test_trainer_takes_the_input_size_from_the_arch_spec():
    from nexedge.train.trainer import TrainConfig

    spec = arch_specs()["tiny"]
    cfg = TrainConfig(data="d", out="o", arch="tiny")
    assert (cfg.resize, cfg.crop) == (spec.resize, spec.crop) == ((72, 72), (64, 64))
    assert TrainConfig(data="d", out="o", arch="tiny", crop=(32, 32)).resize == (72, 72)


def test_any_class_count():
    assert _build("resnet18", n=2)(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    assert _build("resnet18_att2", n=11)(torch.randn(1, 3, 64, 64)).shape == (1, 11)


def test_affine_grid_matches_torch():
    theta = torch.randn(3, 2, 3)
    ours = affine_grid(theta, 7, 9)
    ref = F.affine_grid(theta, (3, 1, 7, 9), align_corners=False)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("params", [6, 3])
def test_stn_starts_at_identity(params):
    stn = SpatialTransformer((32, 40), params=params).eval()
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        th = stn.theta(x)
        y = stn(x)
    torch.testing.assert_close(th, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(2, 2, 3))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)


def test_stn_scale_translation_has_three_params():
    stn = SpatialTransformer((32, 32), params=3)
    with torch.no_grad():
        stn.fc[2].bias.copy_(torch.tensor([0.5, 0.1, -0.2]))
        th = stn.theta(torch.zeros(1, 3, 32, 32))[0]
    torch.testing.assert_close(th, torch.tensor([[0.5, 0.0, 0.1], [0.0, 0.5, -0.2]]))
    with pytest.raises(ValueError, match="6 .affine. or 3"):
        SpatialTransformer((32, 32), params=4)


def test_stn_rejects_wrong_input_size():
    model = _build("resnet18_stn", size=64)
    with pytest.raises(ValueError, match="input_size must equal the crop size"):
        model(torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize("compat", ["concat", "add"])
def test_attention_maps_are_distributions(compat):
    model = _build("resnet18_att2", compat=compat)
    with torch.no_grad():
        logits, (a4, a5) = model.forward_maps(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3)
    assert a4.shape == (2, 1, 4, 4) and a5.shape == (2, 1, 2, 2)
    torch.testing.assert_close(a4.flatten(1).sum(1), torch.ones(2))
    torch.testing.assert_close(a5.flatten(1).sum(1), torch.ones(2))


def test_attention_add_variant_exports():
    _export_and_compare(_build("resnet18_att2", compat="add"))


@pytest.mark.parametrize("hw", [(2, 2), (3, 5), (7, 7), (14, 14), (9, 4)])
def test_exportable_adaptive_pool_equals_torch(hw):
    x = torch.randn(2, 4, *hw)
    torch.testing.assert_close(ExportableAdaptiveAvgPool2d((7, 7))(x), F.adaptive_avg_pool2d(x, (7, 7)))


def test_imagenet_without_network_fails_clearly(tmp_path, monkeypatch):
    import urllib.request

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache
    # urlopen keeps the opener it builds (with the dead proxy below): dropped after the test, so later
    # tests in this process (the demo polls its daemon over HTTP) reach localhost again
    monkeypatch.setattr(urllib.request, "_opener", None)
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens: no network
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(RuntimeError, match="could not download ImageNet weights for resnet18.*--pretrained PATH"):
        create_model("resnet18", 3, pretrained="imagenet")


def test_pretrained_path_loads_backbone_and_reinits_classifier(tmp_path):
    src = create_model("resnet18", 7)
    path = tmp_path / "weights.pt"
    torch.save(src.state_dict(), path)
    dst = create_model("resnet18", 3, pretrained=str(path))
    torch.testing.assert_close(dst.conv1.weight, src.conv1.weight)
    assert dst.fc.weight.shape == (3, 512)
    with pytest.raises(ValueError, match="does not fit resnet18_stn"):  # keys live under backbone.
        create_model("resnet18_stn", 3, pretrained=str(path), input_size=(64, 64))
    with pytest.raises(FileNotFoundError, match="no such file"):
        create_model("resnet18", 3, pretrained=str(tmp_path / "missing.pt"))


def test_pretrained_path_for_other_arch_is_an_error(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(create_model("tiny", 3).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit resnet18"):
        create_model("resnet18", 3, pretrained=str(path))
