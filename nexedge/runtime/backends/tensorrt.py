"""TensorRT backend for ``.engine`` files (Jetson / GPU line computers).

Name-based tensor API (``num_io_tensors``, ``get_tensor_name``,
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``), present from
TensorRT 8.5 (JetPack 5.1) through 10.x. Device buffers are allocated once at
the optimisation profile's maximum, host buffers are pinned, one CUDA stream.
CUDA access through cuda-python (``cuda.bindings.runtime``, older
``cuda.cudart``), falling back to pycuda when cuda-python is missing.

Threads: the daemon opens the backend on one thread and infers on another.
CUDA state is per thread (the runtime API's current device, the driver API's
context stack), so every CUDA and TensorRT call runs inside ``cuda.active()``,
which makes the backend's device/context current on the calling thread.

Nothing here imports tensorrt or CUDA at module import: the module loads (and
is tested for import) on machines without a GPU. Python 3.8, no torch.
"""

import contextlib
import ctypes
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from nexedge.card import ModelCard, load_card
from nexedge.runtime.base import ArtifactIncompatible, Backend, BackendError
from nexedge.runtime.registry import MAX_BATCH, VERIFY, BackendSpec, Option

SPEC = BackendSpec(
    "tensorrt", (".engine", ".plan"), "TensorRTBackend", (
        Option("device", (int,), 0, "CUDA device index"),
        MAX_BATCH,
        VERIFY,
    ), note="a TensorRT engine's crops, threads and batch profile are fixed when it is built; see "
            "nexedge build-engine",
    internal=("card",), requires=("tensorrt",),
    packages=("tensorrt", "tensorrt-cu12", "tensorrt-cu11", "tensorrt_lean"), version="tensorrt:__version__",
    extra="trt", summary="TensorRT engines built on this machine (nexedge build-engine)",
    hint="build an engine first (nexedge build-engine) and bench the .engine file",
    preload=("tensorrt",))


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6.1 (13.x has only this)
    except ImportError:
        from cuda import cudart  # cuda-python 11.x / early 12.x
    return cudart


# TensorRT DataType -> numpy, by enum name. Not trt.nptype: in TensorRT 8.5.2 it maps BOOL through
# np.bool, which numpy >= 1.24 removed (AttributeError on every lookup; pip installs numpy 1.24 on
# the Python 3.8 of JetPack 5). Names from the TensorRT Python API's DataType enum (8.5-10.x).
TRT_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_,
              "UINT8": np.uint8, "INT64": np.int64}


def trt_dtype_to_numpy(dtype: Any) -> np.dtype:
    """numpy dtype of a TensorRT DataType (BackendError for BF16/FP8/INT4, which numpy cannot hold)."""
    name = getattr(dtype, "name", None) or str(dtype).rsplit(".", 1)[-1]
    if name not in TRT_DTYPES:
        raise BackendError(f"engine I/O tensor type {name} has no numpy equivalent; "
                           f"supported: {', '.join(TRT_DTYPES)}")
    return np.dtype(TRT_DTYPES[name])


def _host_array(ptr: int, n: int, dtype: Any) -> np.ndarray:
    """A numpy view of ``n`` items at host address ``ptr`` (any dtype, float16 included:
    np.ctypeslib.as_ctypes_type has no float16)."""
    dtype = np.dtype(dtype)
    buf = (ctypes.c_ubyte * (n * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(buf, dtype=dtype, count=n)


class CudaPython:
    """The few CUDA runtime calls the backend needs, through cuda-python."""

    name = "cuda-python"

    def __init__(self, device: int = 0) -> None:
        self.rt = _import_cudart()
        self.device = int(device)
        with self.active():
            self.stream = self._call(self.rt.cudaStreamCreate())

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The runtime API's current device is per thread (a new thread starts on device 0) and shared by
        everything on that thread, so it is asked each time (cudaGetDevice is a host-side lookup): a
        wrapper on device 1 used after one on device 0 selects device 1 again."""
        if self._call(self.rt.cudaGetDevice()) != self.device:
            self._call(self.rt.cudaSetDevice(self.device))
        yield

    def _call(self, ret: Any) -> Any:
        err, rest = ret[0], ret[1:]
        if err != self.rt.cudaError_t.cudaSuccess:
            raise BackendError(f"CUDA runtime error {err}")
        return rest[0] if len(rest) == 1 else (rest or None)

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def malloc(self, nbytes: int) -> int:
        return int(self._call(self.rt.cudaMalloc(nbytes)))

    def pinned(self, shape: Tuple[int, ...], dtype: Any) -> Tuple[np.ndarray, Any]:
        dtype = np.dtype(dtype)
        n = int(np.prod(shape))
        ptr = int(self._call(self.rt.cudaMallocHost(n * dtype.itemsize)))
        return _host_array(ptr, n, dtype), ptr

    def htod(self, dst: int, src: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, self.stream))

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, self.stream))

    def sync(self) -> None:
        self._call(self.rt.cudaStreamSynchronize(self.stream))

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)

    def free_pinned(self, handle: Any) -> None:
        self.rt.cudaFreeHost(handle)

    def close(self) -> None:
        if self.stream is not None:
            with self.active():
                self.rt.cudaStreamDestroy(self.stream)
            self.stream = None


class PyCuda:
    """The same calls through pycuda (fallback when cuda-python is not installed)."""

    name = "pycuda"

    def __init__(self, device: int = 0) -> None:
        import pycuda.driver as cuda

        cuda.init()
        self.cuda = cuda
        self.ctx = cuda.Device(device).retain_primary_context()
        self._local = threading.local()
        self._allocs: Dict[int, Any] = {}
        with self.active():
            self.stream = cuda.Stream()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Push the primary context on the calling thread for the duration (re-entrant), pop after:
        a pycuda context is current only on the thread that pushed it ("invalid device context")."""
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            self.ctx.push()
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                self.cuda.Context.pop()

    @property
    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def malloc(self, nbytes: int) -> int:
        mem = self.cuda.mem_alloc(nbytes)
        self._allocs[int(mem)] = mem
        return int(mem)

    def pinned(self, shape: Tuple[int, ...], dtype: Any) -> Tuple[np.ndarray, Any]:
        arr = self.cuda.pagelocked_empty((int(np.prod(shape)),), np.dtype(dtype))
        return arr, arr

    def htod(self, dst: int, src: np.ndarray) -> None:
        self.cuda.memcpy_htod_async(dst, src, self.stream)

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        self.cuda.memcpy_dtoh_async(dst, src, self.stream)

    def sync(self) -> None:
        self.stream.synchronize()

    def free(self, ptr: int) -> None:
        mem = self._allocs.pop(ptr, None)
        if mem is not None:
            mem.free()

    def free_pinned(self, handle: Any) -> None:
        base = getattr(handle, "base", None)
        if base is not None and hasattr(base, "free"):
            base.free()

    def close(self) -> None:
        if self.ctx is not None:
            with self.active():
                self.stream = None  # pycuda destroys the stream now, which needs its context current
            self.ctx = None  # the primary context is released with the last reference


def open_cuda(device: int = 0) -> Any:
    """cuda-python if importable, else pycuda; ImportError naming both when neither is."""
    try:
        _import_cudart()
    except ImportError:
        pass
    else:
        return CudaPython(device)
    try:
        return PyCuda(device)
    except ImportError:
        raise ImportError("the TensorRT backend needs cuda-python (pip install cuda-python) or pycuda; "
                          "neither is installed") from None


class _Tensor:
    def __init__(self, name: str, is_input: bool, dtype: Any, max_shape: Tuple[int, ...]) -> None:
        self.name, self.is_input, self.dtype, self.max_shape = name, is_input, np.dtype(dtype), max_shape
        self.device = 0
        self.host: Optional[np.ndarray] = None
        self.host_handle: Any = None


def profile_shapes(engine: Any, name: str) -> Tuple[Tuple[int, ...], ...]:
    """(min, opt, max) shapes of input ``name`` in profile 0 (``get_tensor_profile_shape``, or the pre-10 call)."""
    if hasattr(engine, "get_tensor_profile_shape"):
        shapes = engine.get_tensor_profile_shape(name, 0)
    else:
        shapes = engine.get_profile_shape(0, name)
    return tuple(tuple(int(d) for d in s) for s in shapes)


class TensorRTBackend(Backend):
    """Runs a serialized TensorRT engine described by its card."""

    name = "tensorrt"

    def __init__(self, path: str, card: Optional[ModelCard] = None, device: int = 0,
                 max_batch: Optional[int] = None, verify: bool = True) -> None:
        import tensorrt as trt

        self.cuda: Any = None
        self.tensors: List[_Tensor] = []
        self.context: Any = None
        card = card if card is not None else load_card(path, verify=verify)
        super().__init__(card, max_batch)
        self.path, self.trt = path, trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        engine_info = card.data.get("provenance", {}).get("engine") or {}
        key = engine_info.get("key") or {}
        built = engine_info.get("tensorrt")
        if key.get("version_compatible"):
            self.runtime.engine_host_code_allowed = True  # version-compatible engines embed a lean runtime
        elif built and str(built) != trt.__version__:
            raise ArtifactIncompatible(
                f"{path} was built with TensorRT {built}; this machine has TensorRT {trt.__version__}, which cannot "
                "load it (engines are tied to the TensorRT version). Rebuild it here: nexedge build-engine "
                "<the .onnx it came from> (or run `nexedge doctor`)")
        dla = (engine_info.get("dla") or {}).get("core", key.get("dla_core"))
        if dla is not None:
            # A DLA engine runs on the runtime's DLA core, which must be chosen before deserializing.
            n_dla = int(getattr(self.runtime, "num_DLA_cores", 0))
            if not 0 <= int(dla) < n_dla:
                raise ArtifactIncompatible(f"{path} was built for DLA core {dla}; this device has {n_dla} DLA core(s)")
            self.runtime.DLA_core = int(dla)
        with open(path, "rb") as f:
            blob = f.read()
        # Select the device (and make its context current) before deserializing: TensorRT places the
        # engine on the current device, which on a multi-GPU host is not necessarily ``device``.
        self.cuda = open_cuda(device)
        try:
            with self.cuda.active():
                self.engine = self.runtime.deserialize_cuda_engine(blob)
                if self.engine is None:
                    raise ArtifactIncompatible(
                        f"{path}: TensorRT {trt.__version__} could not deserialize the engine (built with TensorRT "
                        f"{built} on {engine_info.get('board') or engine_info.get('device') or 'another device'}; "
                        "engines are tied to the TensorRT version and the GPU): rebuild it here with nexedge "
                        "build-engine (`nexedge doctor` compares the engine's card with this device)")
                self.context = self.engine.create_execution_context()
                self._allocate()
        except BaseException:
            self.close()
            raise

    def _allocate(self) -> None:
        trt, eng, ctx = self.trt, self.engine, self.context
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        inputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise BackendError(f"{self.path}: expected one input tensor, engine has {inputs}")
        self.input_name = inputs[0]
        in_min, _, in_max = profile_shapes(eng, self.input_name)
        # A static profile (DLA engines) runs only at its one batch: smaller batches are zero-padded.
        self.static_rows = int(in_max[0]) if tuple(in_min) == tuple(in_max) else 0
        per_image = self.k if self.crops == "host" else 1
        if in_max[0] < self.max_batch * per_image:
            raise BackendError(f"{self.path}: engine profile max batch {in_max[0]} is below the card's "
                               f"{self.max_batch} images x {per_image} crops")
        ctx.set_input_shape(self.input_name, in_max)
        for n in names:
            is_in = n == self.input_name
            shape = in_max if is_in else tuple(int(d) for d in ctx.get_tensor_shape(n))
            t = _Tensor(n, is_in, trt_dtype_to_numpy(eng.get_tensor_dtype(n)), shape)
            t.device = self.cuda.malloc(int(np.prod(shape)) * t.dtype.itemsize)
            t.host, t.host_handle = self.cuda.pinned(shape, t.dtype)
            ctx.set_tensor_address(n, t.device)
            self.tensors.append(t)
        if self.crops == "host":
            self.output_name = [n for n in names if n != self.input_name][0]
        else:
            # Score from the mean logits (float64 on the host); engines of graphs from before: probs.
            self.graph_output = "logits" if "logits" in names else "probs"
            if self.graph_output not in names:
                raise BackendError(f"{self.path}: in-graph engine must output 'logits' (or 'probs'), has {names}")
            self.output_name = self.graph_output

    def _execute(self, x: np.ndarray, timings: Dict[str, float]) -> np.ndarray:
        if self.context is None:
            raise BackendError(f"{self.path}: backend is closed")
        with self.cuda.active():
            return self._execute_current(x, timings)

    def _execute_current(self, x: np.ndarray, timings: Dict[str, float]) -> np.ndarray:
        tin = next(t for t in self.tensors if t.is_input)
        tout = next(t for t in self.tensors if t.name == self.output_name)
        if (x.dtype.kind == "f") != (tin.dtype.kind == "f"):
            raise BackendError(f"{self.path}: input dtype {x.dtype}, engine expects {tin.dtype}")
        t0 = time.perf_counter()
        rows = x.shape[0]
        shape = ((self.static_rows,) + tuple(x.shape[1:])) if self.static_rows else tuple(x.shape)
        if self.static_rows and rows > self.static_rows:
            raise BackendError(f"{self.path}: input shape {x.shape} exceeds the static engine shape {tin.max_shape}")
        host_in = tin.host[: int(np.prod(shape))].reshape(shape)
        host_in[:rows] = x  # casts to the engine's input type (e.g. float32 crops into a float16 input)
        if rows < shape[0]:
            host_in[rows:] = 0
        if not self.context.set_input_shape(self.input_name, shape):
            raise BackendError(f"{self.path}: input shape {x.shape} is outside the engine profile {tin.max_shape}")
        self.cuda.htod(tin.device, host_in)
        self.cuda.sync()
        t1 = time.perf_counter()
        if not self.context.execute_async_v3(self.cuda.stream_handle):
            raise BackendError(f"{self.path}: execute_async_v3 failed for input {x.shape}")
        self.cuda.sync()
        t2 = time.perf_counter()
        out_shape = tuple(int(d) for d in self.context.get_tensor_shape(self.output_name))
        host_out = tout.host[: int(np.prod(out_shape))].reshape(out_shape)
        self.cuda.dtoh(host_out, tout.device)
        self.cuda.sync()
        t3 = time.perf_counter()
        timings.update(h2d=t1 - t0, inference=t2 - t1, d2h=t3 - t2)
        return host_out[:rows].astype(np.float32, copy=True)

    def _run_host(self, x: np.ndarray, timings: Dict[str, float]) -> np.ndarray:
        return self._execute(x, timings)

    def _run_graph(self, images: np.ndarray, timings: Dict[str, float]) -> np.ndarray:
        return self._execute(images, timings)

    def close(self) -> None:
        cuda = getattr(self, "cuda", None)
        if cuda is not None:
            with cuda.active():
                for t in getattr(self, "tensors", []):
                    if t.device:
                        cuda.free(t.device)
                    if t.host_handle is not None:
                        cuda.free_pinned(t.host_handle)
                self.tensors = []
                self.context = None  # TensorRT objects go while the context is still current
                self.engine = None
            cuda.close()
            self.cuda = None
        self.context = None
        self.engine = None
