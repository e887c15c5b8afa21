"""A fake ``tensorrt`` builder module that behaves like the real one where our code depends on it.

TensorRT cannot be installed here. The fake is faithful in the points nexedge's
logic depends on, each taken from TensorRT's / onnx-tensorrt's documented behaviour:

* The ONNX parser really parses the bytes (``onnx``) and rejects what onnx-tensorrt
  rejects for our graphs: non-ONNX bytes; a UINT8 tensor used by anything but a
  Cast ("TensorRT does not support UINT8 types for intermediate tensors",
  ModelImporter.cpp 8.6/10.x; 8.5 converts a UINT8 input only in a Cast, per
  DataType::kUINT8); a DequantizeLinear whose input is not INT8 ("only activation
  types allowed as input to this layer", onnx-tensorrt issue 850). Its rules are
  written here independently of nexedge.export.onnx_check.
* The network has one layer per ONNX node; ``IBuilderConfig.can_run_on_DLA``
  says no for a dynamic profile (DLA has no dynamic shapes), without FP16/INT8,
  off the DLA device type, and for layer types DLA lacks.
* TensorRT 11 (``version >= 11``): BuilderFlag has no FP16/INT8, no
  IInt8EntropyCalibrator2, no ``platform_has_fast_*``; networks are strongly typed.
"""

import enum
import types

ONNX_UINT8, ONNX_INT8 = 2, 3
# Layer types a DLA runs (TensorRT developer guide, DLA supported layers; a subset is enough here).
DLA_LAYERS = {"Conv", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Add", "Sub", "Mul",
              "Div", "Concat", "Slice", "Softmax", "Gemm", "BatchNormalization", "Sigmoid", "Clip",
              "QuantizeLinear", "DequantizeLinear"}


def fake_parse_errors(data: bytes, version: tuple) -> list:
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception:
        return ["ModelImporter.cpp: Failed to parse ONNX model from file"]
    g = model.graph
    if not g.node:
        return ["ModelImporter.cpp: Failed to parse ONNX model from file"]
    types_ = {i.name: i.type.tensor_type.elem_type for i in g.input}
    types_.update({i.name: i.data_type for i in g.initializer})
    for n in g.node:  # propagate element types through the ops our graphs use
        if n.op_type == "Cast":
            types_[n.output[0]] = next(a.i for a in n.attribute if a.name == "to")
        elif n.op_type == "QuantizeLinear":
            types_[n.output[0]] = types_.get(n.input[2], ONNX_UINT8) if len(n.input) > 2 else ONNX_UINT8
        elif n.op_type in ("Transpose", "Slice", "Reshape", "Identity", "Flatten", "Unsqueeze", "Concat"):
            if n.input and n.input[0] in types_:
                types_[n.output[0]] = types_[n.input[0]]
    errors = []
    for i, n in enumerate(g.node):
        for name in n.input:
            if types_.get(name) == ONNX_UINT8 and n.op_type != "Cast":
                if version >= (8, 6):
                    errors.append(f"In node {i} (parseGraph): INVALID_NODE: TensorRT does not support UINT8 types "
                                  "for intermediate tensors!")
                else:
                    errors.append(f"In node {i} ({n.op_type}): UINT8 tensor {name} used by {n.op_type}; kUINT8 "
                                  "network inputs must be converted first")
        if n.op_type == "DequantizeLinear" and types_.get(n.input[0]) != ONNX_INT8:
            errors.append(f"In node {i} (importDequantizeLinear): INVALID_NODE: Assertion failed: "
                          "only activation types allowed as input to this layer.")
    return errors


def fake_trt(version="10.3.0.30", fast_int8=True, fast_fp16=True, dla_cores=2, has_platform_queries=True):
    """(module, calls): ``calls`` records what our code asked of the API."""
    calls = {"builds": 0}
    vt = tuple(int(x) for x in version.split(".")[:2])
    trt11 = vt[0] >= 11

    class Flag(enum.IntEnum):
        EXPLICIT_BATCH = 0
        STRONGLY_TYPED = 5

    names = ["GPU_FALLBACK", "VERSION_COMPATIBLE"] + ([] if trt11 else ["FP16", "INT8"])
    BuilderFlag = enum.Enum("BuilderFlag", {n: n for n in names})

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class Tensor:
        def __init__(self, name):
            self.name = name

    class Layer:
        def __init__(self, name, type_):
            self.name, self.type = name, type_

    class Network:
        def __init__(self, flags):
            calls["network_flags"] = flags
            self.layers, self.inputs = [], []

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

        def get_input(self, i):
            return self.inputs[i]

    class Parser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        @property
        def num_errors(self):
            return len(self.errors)

        def parse(self, data):
            import onnx

            calls["parsed_bytes"] = len(data)
            self.errors = fake_parse_errors(data, vt)
            if self.errors:
                return False
            g = onnx.load_from_string(data).graph
            inits = {i.name for i in g.initializer}
            self.network.inputs = [Tensor(i.name) for i in g.input if i.name not in inits]
            self.network.layers = [Layer(n.name or n.output[0], n.op_type) for n in g.node
                                   if n.op_type not in ("Constant", "Identity")]
            return True

        def get_error(self, i):
            return self.errors[i]

    class TimingCache:
        def __init__(self, blob):
            self.blob = blob

        def serialize(self):
            return b"timing:" + self.blob

    class Config:
        def __init__(self):
            self.flags, self.int8_calibrator, self.default_device_type, self.DLA_core = [], None, "GPU", -1
            self.cache, self.profiles = None, []

        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = (pool, size)

        def set_flag(self, flag):
            self.flags.append(flag.value)

        def get_flag(self, flag):
            return flag.value in self.flags

        def add_optimization_profile(self, profile):
            calls["profile"] = profile.shapes
            self.profiles.append(profile)

        def set_calibration_profile(self, profile):
            calls["calibration_profile"] = profile.shapes

        def can_run_on_DLA(self, layer):
            if self.default_device_type != "DLA" or not {"FP16", "INT8"} & set(self.flags):
                return False
            if any(p.shapes[1] != p.shapes[3] for p in self.profiles):  # DLA: no dynamic shapes
                return False
            return layer.type in DLA_LAYERS

        def create_timing_cache(self, blob):
            return TimingCache(blob)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            if not all(a <= b <= c for a, b, c in zip(mn, opt, mx)):
                raise ValueError("profile min <= opt <= max violated")
            self.shapes = (name, tuple(mn), tuple(opt), tuple(mx))

    class Builder:
        num_DLA_cores = dla_cores

        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            return Network(flags)

        def create_builder_config(self):
            calls["config"] = Config()
            return calls["config"]

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls["builds"] += 1
            if config.default_device_type == "DLA":
                calls["dla_layers"] = sum(config.can_run_on_DLA(layer) for layer in network.layers)
                if calls["dla_layers"] < network.num_layers and "GPU_FALLBACK" not in config.flags:
                    return None
            return b"ENGINE-" + ",".join(sorted(config.flags)).encode()

    if has_platform_queries and not trt11:
        Builder.platform_has_fast_int8 = fast_int8
        Builder.platform_has_fast_fp16 = fast_fp16

    mod = types.SimpleNamespace(
        __version__=version, Logger=Logger, Builder=Builder, OnnxParser=Parser,
        NetworkDefinitionCreationFlag=Flag, BuilderFlag=BuilderFlag,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        DeviceType=types.SimpleNamespace(DLA="DLA", GPU="GPU"),
    )
    if not trt11:
        class IInt8EntropyCalibrator2:
            def __init__(self):
                pass

        mod.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    return mod, calls


def export_tiny_models(folder, inp=None, flavours=("host", "ten"), max_batch=8, arch="tiny", qdq=True):
    """Real ONNX models with cards: {flavour: fp32 path, flavour + "-qdq": TensorRT Q/DQ path}."""
    import os

    import torch

    from nexedge.card import load_card
    from nexedge.export import calibrate as cal
    from nexedge.export import quantize as qz
    from nexedge.export.onnx_export import export_onnx
    from nexedge.export.toy import toy_images, train_toy_checkpoint

    torch.set_num_threads(1)
    inp = inp or {"color": "gray", "resize": [36, 36], "crop": [32, 32], "crop_mode": "ten"}
    ckpt = train_toy_checkpoint(os.path.join(folder, f"{arch}.pt"), arch=arch, inp=dict(inp), steps=2)
    out = {}
    imgs = toy_images(8, inp, seed=3)[0]
    for fl in flavours:
        path = export_onnx(ckpt, crops=fl, parity_images=2, max_batch=max_batch, threads=1).path
        out[fl] = path
        if qdq:
            card = load_card(path)
            q = path.replace(".onnx", ".int8-trt.onnx")
            quant = qz.quantize_model(path, q, card, cal.OrtCalibrationReader(imgs, card), "tensorrt")
            qz.int8_card(card, quant, None, {"n_images": len(imgs)}).save_for(q, parent=path)
            out[fl + "-qdq"] = q
    return out
