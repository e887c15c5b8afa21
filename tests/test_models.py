"""Every registered architecture: forward shapes and ONNX export (opset 17, TorchScript exporter)."""

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

import torch.nn.functional as F  # noqa: E402

from nexedge.models import create_model, list_models  # noqa: E402
from nexedge.models.stn import SpatialTransformer, affine_grid  # noqa: E402
from nexedge.models.zoo import ExportableAdaptiveAvgPool2d  # noqa: E402

SMALL = ["resnet18", "resnet34", "resnet50", "resnet18_stn", "resnet34_stn", "resnet50_stn", "resnet18_att2", "tiny",
         "small_max"]
BIG = ["vgg19_bn", "vgg19_bn_stn"]


def _build(name, n=3, size=64, **kw):
    if name == "tiny":
        return create_model(name, n).eval()
    return create_model(name, n, input_size=(size, size), **kw).eval()


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
    assert set(SMALL + BIG) <= names


@pytest.mark.parametrize("name", SMALL)
def test_forward_shape_and_onnx_export(name):
    model = _build(name, n=5)
    out = _export_and_compare(model)
    assert out.shape == (2, 5)


@pytest.mark.slow
def test_vgg_archs_forward_and_export():
    for name in BIG:
        out = _export_and_compare(_build(name, n=4))
        assert out.shape == (2, 4)


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
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache
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
