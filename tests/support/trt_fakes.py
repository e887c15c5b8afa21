"""One fake ``tensorrt`` (builder and runtime) and fake CUDA (cuda-python runtime, pycuda), faithful where our code
depends on them.

TensorRT and CUDA cannot be installed here. The fakes follow TensorRT's / onnx-tensorrt's
documented behaviour in the points nexedge's logic depends on:

* The ONNX parser really parses the bytes (``onnx``) and rejects what onnx-tensorrt
  rejects for our graphs: non-ONNX bytes; a UINT8 tensor used by anything but a
  Cast ("TensorRT does not support UINT8 types for intermediate tensors",
  ModelImporter.cpp 8.6/10.x; 8.5 converts a UINT8 input only in a Cast, per
  DataType::kUINT8); a DequantizeLinear whose input is not INT8 ("only activation
  types allowed as input to this layer", onnx-tensorrt issue 850); before 10.x a
  QuantizeLinear/DequantizeLinear without its zero-point input ("This version of TensorRT
  requires 3 inputs for the DequantizeLinear operator", QuantDequantLinearHelper 8.5/8.6);
  10.x types the output of a 2-input QuantizeLinear INT8. Its rules are written here
  independently of nexedge.export.onnx_check.
* The network has one layer per ONNX node (named as the node, as onnx-tensorrt's
  registerLayer does), with typed input/output tensors; ``IBuilderConfig.can_run_on_DLA``
  says no for a dynamic profile (DLA has no dynamic shapes), without FP16/INT8, off the
  DLA device type, and for layer types DLA lacks.
* The builder checks each optimisation profile against the network input's dimensions
  (a mismatch fails the build) and ``add_optimization_profile`` returns -1 for a profile
  without shapes; ``set_timing_cache`` returns False for a cache made elsewhere.
* The built "engine" runs: with FP16 set, every layer not pinned to FP32 (``precision``
  with OBEY/PREFER_PRECISION_CONSTRAINTS; without those flags TensorRT may ignore the
  constraint, so the fake does) has its float outputs and weights rounded to float16,
  which flushes values below 6e-8 to 0, as TensorRT's FP16 kernels do. The engine is the
  rewritten ONNX graph, run by ONNX Runtime on "device" memory that is host memory.
* The runtime deserializes only engines of its own version (else None, as TensorRT does)
  and records the DLA core set on it before deserializing.
* TensorRT 11 (``version >= 11``): BuilderFlag has no FP16/INT8, no
  IInt8EntropyCalibrator2, no ``platform_has_fast_*``; networks are strongly typed.
* ``DataType`` members are enum members with ``.name`` (pybind11 enums); ``nptype`` raises
  like TensorRT 8.5.x on numpy >= 1.24 (its table uses ``np.bool``, which numpy 1.24 removed).

CUDA (one set of rules, used by every fake here; a fake TensorRT installed with
:func:`use_fake_tensorrt` or :func:`install_fake_pycuda` checks them on every runtime call):

* fake pycuda (:class:`FakeDriver`): a context is current only on the thread that pushed it
  (CUDA driver API context stacks are per thread); every allocation, copy, stream call and
  TensorRT call without a current context fails with "invalid device context", as pycuda's
  LogicError does.
* fake cuda-python runtime (:class:`FakeCudart`): the current device is per thread
  (cudaSetDevice "sets device as the current device for the calling host thread"; a thread
  that never set one runs on device 0), ``cudaSetDevice`` of a device that does not exist fails
  with cudaErrorInvalidDevice, and memory of device 1 used from device 0 fails (stricter than
  CUDA with unified addressing, where such a copy may work: our code must not depend on that).
  The runtime API makes the device's primary context current implicitly, so TensorRT calls need
  no explicit context there.
* TensorRT places a deserialized engine on the current device ("deserializeCudaEngine" uses the
  current context); ``execute_async_v3`` on a thread whose current device is another one, or with
  a stream of another device, fails (returns False): "a kernel launch will fail if it is issued to a
  stream that is not associated to the current device" (CUDA programming guide, stream and event
  behavior).
* "Device" memory is host memory (ctypes buffers at real addresses), so ONNX-Runtime engines and
  the mean-pixel engine of :func:`fake_tensorrt` read and write it the same way under both APIs.
"""

import ctypes
import enum
import json
import sys
import threading
import types

import numpy as np

ONNX_FLOAT, ONNX_UINT8, ONNX_INT8, ONNX_FLOAT16 = 1, 2, 3, 10
# Layer types a DLA runs (TensorRT developer guide, DLA supported layers; a subset is enough here).
DLA_LAYERS = {"Conv", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Add", "Sub", "Mul",
              "Div", "Concat", "Slice", "Softmax", "Gemm", "BatchNormalization", "Sigmoid", "Clip",
              "QuantizeLinear", "DequantizeLinear"}
ENGINE_MAGIC = b"FAKE-TRT-ENGINE"


class DataType(enum.Enum):
    FLOAT, HALF, INT8, INT32, BOOL, UINT8, INT64 = 0, 1, 2, 3, 4, 5, 6


ONNX_TO_TRT = {1: DataType.FLOAT, 10: DataType.HALF, 3: DataType.INT8, 6: DataType.INT32, 9: DataType.BOOL,
               2: DataType.UINT8, 7: DataType.INT64}
LAYER_TYPES = {"Softmax": "SOFTMAX", "QuantizeLinear": "QUANTIZE", "DequantizeLinear": "DEQUANTIZE",
               "Constant": "CONSTANT", "Shape": "SHAPE", "Conv": "CONVOLUTION", "Gemm": "MATRIX_MULTIPLY",
               "MatMul": "MATRIX_MULTIPLY", "Cast": "CAST", "Reshape": "SHUFFLE", "Transpose": "SHUFFLE",
               "Flatten": "SHUFFLE", "Slice": "SLICE", "Concat": "CONCATENATION", "ReduceMean": "REDUCE",
               "ReduceSum": "REDUCE"}
LayerType = enum.Enum("LayerType", {n: n for n in sorted(set(LAYER_TYPES.values()) | {"ELEMENTWISE"})})


class Mode:
    """tensorrt.TensorIOMode."""
    INPUT, OUTPUT = "in", "out"


class Logger:
    """tensorrt.Logger."""
    WARNING = 2

    def __init__(self, level):
        self.level = level


def _q_output_type(n, types_, version):
    if len(n.input) > 2 and n.input[2]:
        return types_.get(n.input[2], ONNX_UINT8)
    return ONNX_INT8 if version >= (10, 0) else ONNX_UINT8  # 10.x: a 2-input Q is INT8


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
            types_[n.output[0]] = _q_output_type(n, types_, version)
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
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and version < (10, 0) \
                and not (len(n.input) > 2 and n.input[2]):
            errors.append(f"In node {i} (QuantDequantLinearHelper): INVALID_NODE: Assertion failed: "
                          "(inputs.size() == 3) && \"This version of TensorRT requires 3 inputs for the "
                          "DequantizeLinear operator.\"")
        if n.op_type == "DequantizeLinear" and types_.get(n.input[0]) != ONNX_INT8:
            errors.append(f"In node {i} (importDequantizeLinear): INVALID_NODE: Assertion failed: "
                          "only activation types allowed as input to this layer.")
    return errors


def fp16_rounded_model(model, rounded: set):
    """``model`` with every float output of the nodes in ``rounded`` (by name) passed through float16,
    and the float weights only those nodes use rounded to float16: FP16 storage, emulated."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inferred = onnx.shape_inference.infer_shapes(m)
    types_ = {v.name: v.type.tensor_type.elem_type for v in
              list(inferred.graph.value_info) + list(g.input) + list(g.output)}
    types_.update({i.name: i.data_type for i in g.initializer})
    users = {}
    for n in g.node:
        for x in n.input:
            users.setdefault(x, set()).add(n.name or n.output[0])
    nodes = []
    for n in g.node:
        nodes.append(n)
        if (n.name or n.output[0]) not in rounded:
            continue
        for k, out in enumerate(list(n.output)):
            if types_.get(out) != ONNX_FLOAT:
                continue
            n.output[k] = out + "__fp32"
            nodes.append(helper.make_node("Cast", [out + "__fp32"], [out + "__fp16"], to=ONNX_FLOAT16))
            nodes.append(helper.make_node("Cast", [out + "__fp16"], [out], to=ONNX_FLOAT))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    for i, init in enumerate(g.initializer):
        if init.data_type == ONNX_FLOAT and users.get(init.name) and users[init.name] <= rounded:
            arr = numpy_helper.to_array(init).astype(np.float16).astype(np.float32)
            g.initializer[i].CopyFrom(numpy_helper.from_array(arr, init.name))
    return m


def _nptype(version: tuple):
    """``tensorrt.nptype``: TensorRT 8.5.x builds its table with ``np.bool``, gone in the numpy >= 1.24
    that pip installs on JetPack 5's Python 3.8, so it raises on every lookup there (numpy here may differ)."""
    table = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
             DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8, DataType.INT64: np.int64}

    def nptype(dt):
        if version < (8, 6):
            raise AttributeError("module 'numpy' has no attribute 'bool'.")
        return table[dt]

    return nptype


def fake_trt(version="10.3.0.30", fast_int8=True, fast_fp16=True, dla_cores=2, has_platform_queries=True,
             timing_cache_accepts=True):
    """(module, calls): ``calls`` records what our code asked of the API."""
    calls = {"builds": 0}
    vt = tuple(int(x) for x in version.split(".")[:2])
    trt11 = vt[0] >= 11

    class Flag(enum.IntEnum):
        EXPLICIT_BATCH = 0
        STRONGLY_TYPED = 5

    names = ["GPU_FALLBACK", "VERSION_COMPATIBLE", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"] \
        + ([] if trt11 else ["FP16", "INT8"])
    BuilderFlag = enum.Enum("BuilderFlag", {n: n for n in names})

    class Tensor:
        def __init__(self, name, dtype=DataType.FLOAT, shape=()):
            self.name, self.dtype, self.shape = name, dtype, tuple(shape)

    class Layer:
        def __init__(self, name, op, inputs, outputs):
            self.name, self.op, self.inputs, self.outputs = name, op, inputs, outputs
            self.type = LayerType[LAYER_TYPES.get(op, "ELEMENTWISE")]
            self._precision, self.out_types = None, {}

        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))
        precision_is_set = property(lambda self: self._precision is not None)

        @property
        def precision(self):
            return self._precision or DataType.FLOAT

        @precision.setter
        def precision(self, dt):
            self._precision = dt

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

        def set_output_type(self, i, dt):
            self.out_types[i] = dt

    class Network:
        def __init__(self, flags):
            calls["network_flags"] = flags
            self.layers, self.inputs, self.outputs, self.onnx = [], [], [], None

        num_layers = property(lambda self: len(self.layers))
        num_outputs = property(lambda self: len(self.outputs))

        def get_layer(self, i):
            return self.layers[i]

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

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
            model = onnx.load_from_string(data)
            g = model.graph
            inferred = onnx.shape_inference.infer_shapes(model).graph
            types_ = {v.name: v.type.tensor_type.elem_type for v in
                      list(inferred.value_info) + list(g.input) + list(g.output)}
            tensors = {}

            def tensor(name):
                if name not in tensors:
                    tensors[name] = Tensor(name, ONNX_TO_TRT.get(types_.get(name), DataType.FLOAT))
                return tensors[name]

            inits = {i.name for i in g.initializer}
            for i in g.input:
                if i.name not in inits:
                    dims = [d.dim_value if d.dim_value > 0 else -1 for d in i.type.tensor_type.shape.dim]
                    tensors[i.name] = Tensor(i.name, ONNX_TO_TRT[i.type.tensor_type.elem_type], dims)
                    self.network.inputs.append(tensors[i.name])
            self.network.layers = [Layer(n.name or n.output[0], n.op_type,
                                         [tensor(x) for x in n.input if x and x not in inits],
                                         [tensor(x) for x in n.output])
                                   for n in g.node if n.op_type not in ("Constant", "Identity")]
            self.network.outputs = [tensor(o.name) for o in g.output]
            self.network.onnx = model
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
            if getattr(profile, "shapes", None) is None:
                return -1
            calls["profile"] = profile.shapes
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_calibration_profile(self, profile):
            calls["calibration_profile"] = profile.shapes

        def can_run_on_DLA(self, layer):
            if self.default_device_type != "DLA" or not {"FP16", "INT8"} & set(self.flags):
                return False
            if any(p.shapes[1] != p.shapes[3] for p in self.profiles):  # DLA: no dynamic shapes
                return False
            return layer.op in DLA_LAYERS

        def create_timing_cache(self, blob):
            return TimingCache(bytes(blob))

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache.blob and not timing_cache_accepts:
                calls["timing_cache_refused"] = cache.blob
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile:
        shapes = None

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
            for p in config.profiles:  # the profile must fit the input's rank and static dims
                inp = next(t for t in network.inputs if t.name == p.shapes[0])
                for s in p.shapes[1:]:
                    if len(s) != len(inp.shape) or any(d >= 0 and d != v for d, v in zip(inp.shape, s)):
                        calls["build_error"] = f"profile {s} does not match input dims {inp.shape}"
                        return None
            if config.default_device_type == "DLA":
                calls["dla_layers"] = sum(config.can_run_on_DLA(layer) for layer in network.layers)
                if calls["dla_layers"] < network.num_layers and "GPU_FALLBACK" not in config.flags:
                    return None
            obey = {"OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"} & set(config.flags)
            pinned = {layer.name for layer in network.layers
                      if obey and layer.precision_is_set and layer.precision == DataType.FLOAT}
            low = [layer.name for layer in network.layers if layer.name not in pinned
                   and layer.type.name not in ("QUANTIZE", "DEQUANTIZE", "SHAPE", "CONSTANT")
                   and any(t.dtype == DataType.FLOAT for t in layer.outputs)]
            calls["pinned"], calls["fp16_layers"] = sorted(pinned), []
            model = network.onnx
            if "FP16" in config.flags:
                calls["fp16_layers"] = low
                model = fp16_rounded_model(model, set(low))
            if "INT8" in config.flags and config.int8_calibrator is not None:
                calls["int8_quantizable"] = low  # implicit INT8 may quantize any of these
            meta = {"flags": sorted(config.flags), "tensorrt": version, "profile": [list(x) for x in
                    config.profiles[0].shapes[1:]] if config.profiles else None,
                    "dla_core": config.DLA_core if config.default_device_type == "DLA" else None}
            head = b"ENGINE-" + ",".join(sorted(f for f in config.flags if f in ("FP16", "INT8", "GPU_FALLBACK",
                                                                               "VERSION_COMPATIBLE"))).encode()
            return head + b"\n" + ENGINE_MAGIC + json.dumps(meta).encode() + b"\n" + model.SerializeToString()

    if has_platform_queries and not trt11:
        Builder.platform_has_fast_int8 = fast_int8
        Builder.platform_has_fast_fp16 = fast_fp16

    class Runtime:
        num_DLA_cores = dla_cores

        def __init__(self, logger):
            self.DLA_core, self.engine_host_code_allowed = -1, False

        def deserialize_cuda_engine(self, blob):
            cuda = mod.cuda
            if cuda is not None:
                cuda.require("deserializeCudaEngine")  # the engine goes to the current device/context
            calls["deserialize_dla_core"] = self.DLA_core
            blob = bytes(blob)
            try:
                _head, rest = blob.split(b"\n", 1)
                meta_line, onnx_bytes = rest.split(b"\n", 1)
                meta = json.loads(meta_line[len(ENGINE_MAGIC):])
            except ValueError:
                return None  # not an engine ("Serialization assertion ... failed", logged by TensorRT)
            if not meta_line.startswith(ENGINE_MAGIC) or meta["tensorrt"] != version:
                return None  # engines are tied to the TensorRT version that built them
            calls["engine_dla_core"] = self.DLA_core if meta["dla_core"] is not None else None
            return Engine(meta, onnx_bytes, cuda.current_device() if cuda is not None else None)

    class Engine:
        def __init__(self, meta, onnx_bytes, device=None):
            import onnxruntime as ort

            self.device = device

            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            self.session = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
            self.meta = meta
            self.inp = self.session.get_inputs()[0]
            self.names = [self.inp.name] + [o.name for o in self.session.get_outputs()]
            types_ = {"tensor(float)": DataType.FLOAT, "tensor(uint8)": DataType.UINT8,
                      "tensor(float16)": DataType.HALF}
            self.dtypes = {a.name: types_[a.type] for a in [self.inp] + list(self.session.get_outputs())}

        num_io_tensors = property(lambda self: len(self.names))

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return Mode.INPUT if name == self.inp.name else Mode.OUTPUT

        def get_tensor_profile_shape(self, name, p):
            return [tuple(s) for s in self.meta["profile"]]

        def get_tensor_dtype(self, name):
            return self.dtypes[name]

        def create_execution_context(self):
            if mod.cuda is not None:
                mod.cuda.require("createExecutionContext")
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addr, self._out_shapes = engine, {}, {}, {}

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.meta["profile"]
            if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
                return False
            self.shapes[name] = tuple(int(d) for d in shape)
            return True

        def _run(self, x):
            return dict(zip(self.engine.names[1:], self.engine.session.run(None, {self.engine.inp.name: x})))

        def get_tensor_shape(self, name):
            shape = self.shapes[self.engine.inp.name]
            if name == self.engine.inp.name:
                return shape
            if shape not in self._out_shapes:
                dt = np.uint8 if self.engine.dtypes[self.engine.inp.name] == DataType.UINT8 else np.float32
                self._out_shapes[shape] = {k: v.shape for k, v in self._run(np.zeros(shape, dt)).items()}
            return self._out_shapes[shape][name]

        def set_tensor_address(self, name, ptr):
            self.addr[name] = int(ptr)
            return True

        def execute_async_v3(self, stream):
            if mod.cuda is not None and not mod.cuda.may_launch(self.engine.device, stream, self.addr.values()):
                calls["failed_executions"] = calls.get("failed_executions", 0) + 1
                return False  # TensorRT logs the CUDA error and returns False
            name = self.engine.inp.name
            shape = self.shapes[name]
            dt = np.dtype(np.uint8 if self.engine.dtypes[name] == DataType.UINT8 else np.float32)
            n = int(np.prod(shape)) * dt.itemsize
            x = np.frombuffer((ctypes.c_ubyte * n).from_address(self.addr[name]), dt).reshape(shape).copy()
            for k, v in self._run(x).items():
                v = np.ascontiguousarray(v, np.float32)
                ctypes.memmove(self.addr[k], v.ctypes.data, v.nbytes)
            calls["executions"] = calls.get("executions", 0) + 1
            return True

    mod = types.SimpleNamespace(
        __version__=version, Logger=Logger, Builder=Builder, OnnxParser=Parser,
        NetworkDefinitionCreationFlag=Flag, BuilderFlag=BuilderFlag, DataType=DataType, LayerType=LayerType,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        DeviceType=types.SimpleNamespace(DLA="DLA", GPU="GPU"), Runtime=Runtime, TensorIOMode=Mode,
        float32=DataType.FLOAT, float16=DataType.HALF, nptype=_nptype(vt),
        cuda=None,  # the fake CUDA whose rules the runtime side checks (set by use_fake_tensorrt)
    )
    if not trt11:
        class IInt8EntropyCalibrator2:
            def __init__(self):
                pass

        mod.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2
    return mod, calls


class FakeCudart:
    """cuda-python's runtime API as the TensorRT backend uses it; "device" memory is host memory (ctypes).

    The current device is per thread (``cudaSetDevice``; a new thread starts on device 0); a device
    that does not exist is cudaErrorInvalidDevice; a copy to or from memory of another device than the
    calling thread's current one fails with cudaErrorInvalidDevice; with a driver older than the runtime
    (``driver < runtime``, CUDA versions as 1000 * major + 10 * minor) device calls fail with
    cudaErrorInsufficientDriver ("the installed NVIDIA CUDA driver is older than the CUDA runtime
    library"), the version queries still answer. ``devices``: how many GPUs (a Jetson has one)."""

    class cudaError_t(enum.Enum):
        cudaSuccess = 0
        cudaErrorInsufficientDriver = 35
        cudaErrorInvalidDevice = 101

    class cudaMemcpyKind(enum.Enum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self, name=b"Orin", cc=(8, 7), sms=16, driver=12060, runtime=12060, devices=1,
                 total_mem=61 << 30):
        self.tls, self.bufs, self.owner, self.ok = threading.local(), {}, {}, self.cudaError_t.cudaSuccess
        self.props = types.SimpleNamespace(name=name, major=cc[0], minor=cc[1], multiProcessorCount=sms,
                                           totalGlobalMem=total_mem)
        self.versions, self.devices = (driver, runtime), devices
        self.streams = {}  # handle -> device it was created on
        self._next_stream = 7

    # the rules the fake TensorRT checks ------------------------------------------------------------
    def current_device(self) -> int:
        return getattr(self.tls, "device", 0)

    def require(self, call: str) -> None:
        """The runtime API makes the current device's primary context current implicitly: nothing to check."""

    def may_launch(self, device, stream, ptrs) -> bool:
        """A kernel launch needs the engine's device current, a stream of that device and memory on it."""
        dev = self.current_device()
        return (device in (None, dev) and self.streams.get(int(stream), dev) == dev
                and all(self.owner.get(int(p), dev) == dev for p in ptrs))

    # cuda-python's API -----------------------------------------------------------------------------
    def cudaSetDevice(self, d):
        if not 0 <= int(d) < self.devices:
            return (self.cudaError_t.cudaErrorInvalidDevice,)
        self.tls.device = int(d)
        return (self.ok,)

    def cudaGetDevice(self):
        return (self.ok, self.current_device())

    def cudaStreamCreate(self):
        self._next_stream += 1
        self.streams[self._next_stream] = self.current_device()
        return (self.ok, self._next_stream)

    def cudaStreamDestroy(self, s):
        self.streams.pop(int(s), None)
        return (self.ok,)

    def cudaMallocHost(self, n):
        buf = ctypes.create_string_buffer(max(1, n))
        self.bufs[ctypes.addressof(buf)] = buf
        return (self.ok, ctypes.addressof(buf))

    def cudaMalloc(self, n):
        ok, ptr = self.cudaMallocHost(n)
        self.owner[ptr] = self.current_device()
        return (ok, ptr)

    def cudaFree(self, ptr):
        self.bufs.pop(int(ptr), None)
        self.owner.pop(int(ptr), None)
        return (self.ok,)

    cudaFreeHost = cudaFree

    def _check(self, ptr):
        dev = self.current_device()
        return self.ok if self.owner.get(int(ptr), dev) == dev else self.cudaError_t.cudaErrorInvalidDevice

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        err = self._check(dst if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else src)
        if err == self.ok:
            ctypes.memmove(dst, src, n)
        return (err,)

    def cudaStreamSynchronize(self, s):
        return (self.ok,)

    def cudaGetDeviceProperties(self, d):
        if self.versions[0] < self.versions[1]:
            return (self.cudaError_t.cudaErrorInsufficientDriver, None)
        if not 0 <= int(d) < self.devices:
            return (self.cudaError_t.cudaErrorInvalidDevice, None)
        return (self.ok, self.props)

    def cudaDriverGetVersion(self):
        return (self.ok, self.versions[0])

    def cudaRuntimeGetVersion(self):
        return (self.ok, self.versions[1])


def use_fake_tensorrt(monkeypatch, trt, cudart=None):
    """Install ``trt`` as ``tensorrt`` and a :class:`FakeCudart` as cuda-python's runtime, for this test;
    ``trt``'s runtime then checks that CUDA's rules."""
    import nexedge.runtime.backends.tensorrt as rtmod

    cudart = cudart or FakeCudart()
    if hasattr(trt, "cuda"):
        trt.cuda = cudart
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(rtmod, "_import_cudart", lambda: cudart)
    return cudart


class LogicError(RuntimeError):
    """pycuda.driver.LogicError."""


class FakeDriver:
    """Just enough of pycuda.driver, with per-thread context stacks; memory is host memory (ctypes)."""

    LogicError = LogicError

    def __init__(self):
        self.tls = threading.local()
        self.mem, self._bufs = {}, {}  # device pointer -> uint8 view of its bytes / the ctypes buffer
        self.driver = self
        self.stream_deaths = []  # per destroyed Stream: was a context current (cuStreamDestroy needs one)

        drv = self

        class Context:
            def __init__(self, device):
                self.device = device

            def push(self):
                drv._stack().append(self)

            @staticmethod
            def pop():
                if not drv._stack():
                    raise LogicError("cuCtxPopCurrent failed: invalid device context")
                drv._stack().pop()

        class Device:
            def __init__(self, i):
                self.i = i

            def retain_primary_context(self):
                return Context(self.i)

        class Stream:
            def __init__(self):
                drv.require("cuStreamCreate")
                self.handle = 99
                self.device = drv.current_device()

            def synchronize(self):
                drv.require("cuStreamSynchronize")

            def __del__(self):
                drv.stream_deaths.append(bool(drv._stack()))

        class Alloc:
            def __init__(self, ptr):
                self.ptr = ptr

            def __int__(self):
                return self.ptr

            def free(self):
                drv.require("cuMemFree")

        self.Context, self.Device, self.Stream, self._Alloc = Context, Device, Stream, Alloc

    def _stack(self):
        if not hasattr(self.tls, "stack"):
            self.tls.stack = []
        return self.tls.stack

    def require(self, call):
        if not self._stack():
            raise LogicError(f"{call} failed: invalid device context")

    def current(self):
        return self._stack()[-1] if self._stack() else None

    def current_device(self):
        ctx = self.current()
        return ctx.device if ctx is not None else None

    def may_launch(self, device, stream, ptrs) -> bool:
        self.require("enqueueV3")
        return device in (None, self.current_device())

    def init(self):
        pass

    def mem_alloc(self, n):
        self.require("cuMemAlloc")
        buf = ctypes.create_string_buffer(max(1, n))
        ptr = ctypes.addressof(buf)
        self._bufs[ptr] = buf
        self.mem[ptr] = np.frombuffer(buf, np.uint8, count=n)
        return self._Alloc(ptr)

    def pagelocked_empty(self, shape, dtype):
        self.require("cuMemHostAlloc")
        return np.zeros(shape, dtype)

    def memcpy_htod_async(self, dst, src, stream):
        self.require("cuMemcpyHtoDAsync")
        self.mem[int(dst)][: src.nbytes] = np.ascontiguousarray(src).reshape(-1).view(np.uint8)

    def memcpy_dtoh_async(self, dst, src, stream):
        self.require("cuMemcpyDtoHAsync")
        dst.reshape(-1).view(np.uint8)[:] = self.mem[int(src)][: dst.nbytes]


def install_fake_pycuda(monkeypatch, trt=None):
    """Install a :class:`FakeDriver` as ``pycuda.driver`` (cuda-python made unimportable, so the backend
    takes pycuda), and ``trt`` as ``tensorrt`` checking its rules, for this test (fixture
    ``pycuda_fake`` in conftest.py)."""
    import nexedge.runtime.backends.tensorrt as rt

    drv = FakeDriver()
    pkg = types.ModuleType("pycuda")
    pkg.driver = drv
    monkeypatch.setitem(sys.modules, "pycuda", pkg)
    monkeypatch.setitem(sys.modules, "pycuda.driver", drv)

    def no_cuda_python():
        raise ImportError("No module named 'cuda'")

    monkeypatch.setattr(rt, "_import_cudart", no_cuda_python)
    if trt is not None:
        trt.cuda = drv
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return drv


def fake_tensorrt(mem, require, in_dtype=DataType.UINT8, out_dtype=DataType.FLOAT, image_shape=(36, 36, 1),
                  in_name="images", out_names=("probs", "defect_score"), profile=(1, 2, 4), n_classes=3,
                  version="8.5.2.2", streams=None):
    """The runtime side of TensorRT with an engine computing probs from the mean pixel (no ONNX export
    needed): the engine file must hold ``b"ENGINE"`` (other bytes deserialize to None, as TensorRT's do);
    every CUDA-dependent call checks a current context via ``require`` (a fake's ``require``, or a
    wrapper recording the calls). ``mem``: the fake CUDA's device pointer -> uint8 view. ``streams``: if
    given, the stream handles an execution may be enqueued on (any other: execute_async_v3 returns False)."""
    np_types = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.UINT8: np.uint8}

    class Context:
        def __init__(self):
            self.shapes, self.addr = {}, {}

        def set_input_shape(self, name, shape):
            if not profile[0] <= shape[0] <= profile[2]:
                return False
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            n = self.shapes[in_name][0]
            return (n, n_classes) if name == out_names[0] else (n,)

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def execute_async_v3(self, stream):
            require("enqueueV3")
            if streams is not None and stream not in streams:
                return False
            n = self.shapes[in_name][0]
            dt = np.dtype(np_types[in_dtype])
            x = mem[self.addr[in_name]][: n * int(np.prod(image_shape)) * dt.itemsize].view(dt)
            m = x.reshape(n, -1).astype(np.float32).mean(1) / (255.0 if dt == np.uint8 else 1.0)
            probs = np.stack([m, (1 - m) / 2, (1 - m) / 2], 1).astype(np_types[out_dtype])
            mem[self.addr[out_names[0]]][: probs.nbytes] = probs.reshape(-1).view(np.uint8)
            return True

    class Engine:
        num_io_tensors = 1 + len(out_names)
        names = [in_name, *out_names]

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_mode(self, name):
            return Mode.INPUT if name == in_name else Mode.OUTPUT

        def get_tensor_profile_shape(self, name, p):
            return [(b,) + tuple(image_shape) for b in profile]

        def get_tensor_dtype(self, name):
            return in_dtype if name == in_name else out_dtype

        def create_execution_context(self):
            require("createExecutionContext")
            return Context()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            require("deserializeCudaEngine")  # TensorRT places the engine on the current device/context
            return Engine() if bytes(blob) == b"ENGINE" else None

    vt = tuple(int(x) for x in version.split(".")[:2])
    return types.SimpleNamespace(__version__=version, Logger=Logger, Runtime=Runtime, TensorIOMode=Mode,
                                 DataType=DataType, nptype=_nptype(vt))


def fake_engine_file(tmp_path, crops="five", max_batch=4, resize=(36, 36), tensorrt="8.5.2.2", blob=b"ENGINE"):
    """An engine file for :func:`fake_tensorrt` with its card (classes good/chip/scratch, crop 32)."""
    from nexedge.card import ModelCard

    path = tmp_path / "m.engine"
    path.write_bytes(blob)
    card = ModelCard.new(["good", "chip", "scratch"], resize=resize, crop=(32, 32), crop_mode="five",
                         kind="engine", precision="fp16")
    card.data["graph"] = {"crops": crops, "input_name": "images" if crops != "host" else "input",
                          "output_names": ["probs", "defect_score"] if crops != "host" else ["logits"],
                          "max_batch": max_batch}
    card.data["provenance"]["engine"] = {"tensorrt": tensorrt, "key": {"version_compatible": False}}
    card.save_for(str(path))
    return str(path)


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


#: Runs ``nexedge`` as a Jetson's line install would: torch, torchvision, scikit-learn, scipy and
#: matplotlib cannot be imported; TensorRT and CUDA are these fakes (argv[1]: TensorRT version).
LINE_INSTALL_CLI = '''
import os, sys
BLOCKED = ("torch", "torchvision", "sklearn", "scipy", "matplotlib")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not part of the line install")
sys.meta_path.insert(0, Block())
from tests.support import trt_fakes as _trt_fakes
import nexedge.runtime.backends.tensorrt as rtmod
from nexedge.export import cuda_device
trt, calls = _trt_fakes.fake_trt(sys.argv[1])
sys.modules["tensorrt"] = trt
cudart = _trt_fakes.FakeCudart()
trt.cuda = cudart
rtmod._import_cudart = lambda: cudart
cuda_device.device_info = lambda device=0: cuda_device.DeviceInfo("Orin", (8, 7), 16, 61, "NVIDIA Jetson AGX Orin Developer Kit")
from nexedge.cli import main
sys.exit(main(sys.argv[2:]))
'''


def run_line_install_cli(args, trt_version="10.3.0.30", cwd=None, timeout=300):
    """``nexedge ARGS`` in a subprocess without the training stack, on the fake TensorRT (see above)."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.support importable
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", LINE_INSTALL_CLI, trt_version, *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)
