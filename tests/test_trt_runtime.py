"""TensorRT backend logic around CUDA contexts, threads and dtypes, with fakes that enforce CUDA's rules.

No GPU or TensorRT here. The fakes are faithful where our code depends on them:

* fake pycuda: a context is current only on the thread that pushed it (CUDA driver API
  context stacks are per thread); every allocation, copy, stream call and TensorRT
  call without a current context fails with "invalid device context", as pycuda's
  LogicError does.
* fake cuda-python runtime: the current device is per thread (cudaSetDevice), a new
  thread starts on device 0, and memory of device 1 used from device 0 fails.
* fake tensorrt: DataType enum members with ``.name``; ``nptype`` raises like
  TensorRT 8.5.2 on numpy >= 1.24; deserialize/execute need a current context.
"""

import contextlib
import ctypes
import enum
import sys
import threading
import types

import numpy as np
import pytest

from nexedge.card import ModelCard
from nexedge.runtime import open_backend
from nexedge.runtime.base import BackendError


class LogicError(RuntimeError):
    pass


class FakeDriver:
    """Just enough of pycuda.driver, with per-thread context stacks."""

    LogicError = LogicError

    def __init__(self):
        self.tls = threading.local()
        self.mem, self.next = {}, 0x1000
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

    def init(self):
        pass

    def mem_alloc(self, n):
        self.require("cuMemAlloc")
        self.next += 0x1000
        self.mem[self.next] = np.zeros(n, np.uint8)
        return self._Alloc(self.next)

    def pagelocked_empty(self, shape, dtype):
        self.require("cuMemHostAlloc")
        return np.zeros(shape, dtype)

    def memcpy_htod_async(self, dst, src, stream):
        self.require("cuMemcpyHtoDAsync")
        self.mem[int(dst)][: src.nbytes] = np.ascontiguousarray(src).reshape(-1).view(np.uint8)

    def memcpy_dtoh_async(self, dst, src, stream):
        self.require("cuMemcpyDtoHAsync")
        dst.reshape(-1).view(np.uint8)[:] = self.mem[int(src)][: dst.nbytes]


class DataType(enum.Enum):
    FLOAT, HALF, INT8, INT32, BOOL, UINT8 = 0, 1, 2, 3, 4, 5


def fake_tensorrt(mem, require, in_dtype=DataType.UINT8, out_dtype=DataType.FLOAT, image_shape=(36, 36, 1),
                  in_name="images", out_names=("probs", "defect_score"), profile=(1, 2, 4), n_classes=3):
    """An engine computing probs from the mean pixel; every call checks a current context via ``require``."""
    np_types = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.UINT8: np.uint8}

    class Mode:
        INPUT, OUTPUT = "in", "out"

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
            return Engine()

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    def nptype(dt):  # TensorRT 8.5.2 on numpy >= 1.24
        raise AttributeError("module 'numpy' has no attribute 'bool'.")

    return types.SimpleNamespace(__version__="8.5.2.2", Logger=Logger, Runtime=Runtime, TensorIOMode=Mode,
                                 DataType=DataType, nptype=nptype)


def _engine(tmp_path, crops="five", max_batch=4, resize=(36, 36)):
    path = tmp_path / "m.engine"
    path.write_bytes(b"ENGINE")
    card = ModelCard.new(["good", "chip", "scratch"], resize=resize, crop=(32, 32), crop_mode="five",
                         kind="engine", precision="fp16")
    card.data["graph"] = {"crops": crops, "input_name": "images" if crops != "host" else "input",
                          "output_names": ["probs", "defect_score"] if crops != "host" else ["logits"],
                          "max_batch": max_batch}
    card.data["provenance"]["engine"] = {"tensorrt": "8.5.2.2", "key": {"version_compatible": False}}
    card.save_for(str(path))
    return str(path)


@pytest.fixture
def pycuda_fake(monkeypatch):
    import nexedge.runtime.backends.tensorrt as rt

    drv = FakeDriver()
    pkg = types.ModuleType("pycuda")
    pkg.driver = drv
    monkeypatch.setitem(sys.modules, "pycuda", pkg)
    monkeypatch.setitem(sys.modules, "pycuda.driver", drv)

    def no_cuda_python():
        raise ImportError("No module named 'cuda'")

    monkeypatch.setattr(rt, "_import_cudart", no_cuda_python)
    return drv


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 36, 36, 1), dtype=np.uint8)


def test_pycuda_backend_infers_on_another_thread_with_fake_cuda(tmp_path, monkeypatch, pycuda_fake):
    """Item 7: the daemon opens the backend on one thread and infers on another; with pycuda the
    context must be current on the inferring thread (it was pushed only on the opening one)."""
    drv = pycuda_fake
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(drv.mem, drv.require))
    be = open_backend(_engine(tmp_path))
    assert drv.current() is None  # nothing left pushed on the opening thread
    imgs, out, errs = _images(3), {}, []

    def worker():
        try:
            out["res"] = be.infer(imgs)
            out["left"] = drv.current()
        except Exception as e:  # reported to the main thread
            errs.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert not errs, errs
    m = imgs.reshape(3, -1).mean(1) / 255.0
    np.testing.assert_allclose(out["res"].probs[:, 0], m, rtol=1e-6)
    assert out["left"] is None
    be.close()
    assert drv.current() is None


def test_fake_cuda_enforces_context_affinity(pycuda_fake):
    """The fake must fail where CUDA does, or the test above proves nothing."""
    drv = pycuda_fake
    with pytest.raises(LogicError, match="invalid device context"):
        drv.mem_alloc(16)
    ctx = drv.Device(0).retain_primary_context()
    ctx.push()
    drv.mem_alloc(16)
    errs = []
    t = threading.Thread(target=lambda: errs.append(pytest.raises(LogicError, drv.Stream)))
    t.start()
    t.join()
    assert errs
    drv.Context.pop()


def test_backend_deserializes_after_selecting_the_device_with_fake_cuda(tmp_path, monkeypatch, pycuda_fake):
    """Item 7: deserialize_cuda_engine runs with the chosen device's context current (multi-GPU hosts)."""
    drv = pycuda_fake
    seen = []

    def require(call):
        drv.require(call)
        seen.append((call, drv.current().device))

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(drv.mem, require))
    from nexedge.runtime.backends.tensorrt import TensorRTBackend

    with TensorRTBackend(_engine(tmp_path), device=1) as be:
        be.infer(_images(1))
    assert ("deserializeCudaEngine", 1) in seen and all(dev == 1 for _, dev in seen)


def test_fp16_io_engine_with_fake_cuda(tmp_path, monkeypatch, pycuda_fake):
    """Item 6: an engine with HALF input (host crops) and HALF output, through our own dtype map
    (trt.nptype raises as in TensorRT 8.5.2 on numpy >= 1.24)."""
    drv = pycuda_fake
    trt = fake_tensorrt(drv.mem, drv.require, in_dtype=DataType.HALF, out_dtype=DataType.HALF,
                        image_shape=(3, 32, 32), in_name="input", out_names=("logits",), profile=(5, 10, 20))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with open_backend(_engine(tmp_path, crops="host")) as be:
        res = be.infer(_images(2))
    assert res.probs.dtype == np.float32 and res.probs.shape == (2, 3) and np.all(np.isfinite(res.probs))


def test_trt_dtype_map():
    from nexedge.runtime.backends.tensorrt import trt_dtype_to_numpy

    assert trt_dtype_to_numpy(DataType.HALF) == np.float16 and trt_dtype_to_numpy(DataType.BOOL) == np.bool_
    assert trt_dtype_to_numpy(DataType.UINT8) == np.uint8

    class Bf(enum.Enum):
        BF16 = 7

    with pytest.raises(BackendError, match="BF16 has no numpy equivalent"):
        trt_dtype_to_numpy(Bf.BF16)


def test_static_profile_engine_pads_small_batches_with_fake_cuda(tmp_path, monkeypatch, pycuda_fake):
    """Item 8: a DLA engine has min = opt = max; a smaller batch is zero-padded and the extra rows dropped."""
    drv = pycuda_fake
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(drv.mem, drv.require, profile=(4, 4, 4)))
    imgs = _images(3)
    with open_backend(_engine(tmp_path)) as be:
        res = be.infer(imgs)
        assert res.probs.shape == (3, 3)
        np.testing.assert_allclose(res.probs[:, 0], imgs.reshape(3, -1).mean(1) / 255.0, rtol=1e-6)
        assert be.infer(_images(4)).probs.shape == (4, 3)


class FakeCudart:
    """cuda-python's runtime API: the current device is per thread; host memory is real (ctypes)."""

    class cudaError_t(enum.Enum):
        cudaSuccess = 0
        cudaErrorInvalidDevice = 101

    class cudaMemcpyKind(enum.Enum):
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self):
        self.tls, self.bufs, self.owner = threading.local(), {}, {}
        self.ok = self.cudaError_t.cudaSuccess

    def _dev(self):
        return getattr(self.tls, "device", 0)

    def cudaSetDevice(self, d):
        self.tls.device = d
        return (self.ok,)

    def cudaStreamCreate(self):
        return (self.ok, 5)

    def cudaMallocHost(self, n):
        buf = ctypes.create_string_buffer(n)
        self.bufs[ctypes.addressof(buf)] = buf
        return (self.ok, ctypes.addressof(buf))

    def cudaMalloc(self, n):
        ok, ptr = self.cudaMallocHost(n)
        self.owner[ptr] = self._dev()
        return (ok, ptr)

    def _check(self, ptr):
        return self.ok if self.owner.get(ptr, self._dev()) == self._dev() else self.cudaError_t.cudaErrorInvalidDevice

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        dev = dst if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice else src
        err = self._check(dev)
        if err == self.ok:
            ctypes.memmove(dst, src, n)
        return (err,)

    def cudaStreamSynchronize(self, s):
        return (self.ok,)


def test_cuda_python_pinned_float16_and_per_thread_device_with_fake_cudart(monkeypatch):
    """Items 6 and 7: pinned float16 buffers (np.ctypeslib.as_ctypes_type has no float16), and device 1
    stays current on a second thread (the runtime API's current device is per thread)."""
    import nexedge.runtime.backends.tensorrt as rt

    fake = FakeCudart()
    monkeypatch.setattr(rt, "_import_cudart", lambda: fake)
    cuda = rt.CudaPython(device=1)
    host, _ = cuda.pinned((2, 3), np.float16)
    host[:] = np.arange(6, dtype=np.float16)
    assert host.dtype == np.float16 and host.sum() == 15
    dev = cuda.malloc(host.nbytes)
    errs = []

    def worker():
        try:
            with cuda.active():
                cuda.htod(dev, host)
                back = np.zeros(6, np.float16)
                cuda.dtoh(back, dev)
                assert back.tolist() == host.tolist()
        except Exception as e:
            errs.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert not errs, errs
    with contextlib.suppress(Exception):
        cuda.close()


def test_pycuda_stream_is_destroyed_inside_its_context_with_fake_cuda(tmp_path, monkeypatch, pycuda_fake):
    """Issue 28 item 7: pycuda destroys a Stream when its last reference goes (cuStreamDestroy), which
    needs the context current; close() dropped it after popping the context."""
    drv = pycuda_fake
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(drv.mem, drv.require))
    be = open_backend(_engine(tmp_path))
    be.infer(_images(1))
    be.close()
    assert drv.stream_deaths == [True] and drv.current() is None
