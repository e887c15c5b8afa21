"""TensorRT backend logic around CUDA contexts, threads and dtypes, with fakes that enforce CUDA's rules.

No GPU or TensorRT here. The fakes (tests/support/trt_fakes.py, whose docstring cites the documented
behaviour each rule follows) are faithful where our code depends on them:

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
import enum
import sys
import threading

import numpy as np
import pytest

from nexedge.runtime import open_backend
from nexedge.runtime.base import BackendError
from tests.support.trt_fakes import DataType, FakeCudart, LogicError, fake_tensorrt
from tests.support.trt_fakes import fake_engine_file as _engine


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


def test_fake_cudart_enforces_the_per_thread_device():
    """The fake cuda-python runtime must fail where CUDA does: a new thread starts on device 0, memory and
    streams of device 1 are not usable from there, and a device that does not exist cannot be selected."""
    fake = FakeCudart(devices=2)
    assert fake.cudaSetDevice(2)[0] == fake.cudaError_t.cudaErrorInvalidDevice
    assert fake.cudaSetDevice(1)[0] == fake.ok
    _, ptr = fake.cudaMalloc(16)
    _, stream = fake.cudaStreamCreate()
    host = np.zeros(16, np.uint8)
    h2d = fake.cudaMemcpyKind.cudaMemcpyHostToDevice
    assert fake.cudaMemcpyAsync(ptr, host.ctypes.data, 16, h2d, stream)[0] == fake.ok
    assert fake.may_launch(1, stream, [ptr])
    seen = []

    def worker():
        seen.append(fake.current_device())
        seen.append(fake.cudaMemcpyAsync(ptr, host.ctypes.data, 16, h2d, stream)[0])
        seen.append(fake.may_launch(1, stream, [ptr]))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [0, fake.cudaError_t.cudaErrorInvalidDevice, False]


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


def test_cuda_python_pinned_float16_and_per_thread_device_with_fake_cudart(monkeypatch):
    """Items 6 and 7: pinned float16 buffers (np.ctypeslib.as_ctypes_type has no float16), and device 1
    stays current on a second thread (the runtime API's current device is per thread)."""
    import nexedge.runtime.backends.tensorrt as rt

    fake = FakeCudart(devices=2)
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


def test_two_cuda_python_wrappers_on_one_thread_each_use_their_device_with_fake_cudart(monkeypatch):
    """The current device belongs to the thread, not to a wrapper: after a wrapper on device 0 ran on this
    thread, one on device 1 must select device 1 again, or its buffers silently land on device 0."""
    import nexedge.runtime.backends.tensorrt as rt

    fake = FakeCudart(devices=2)
    monkeypatch.setattr(rt, "_import_cudart", lambda: fake)
    a = rt.CudaPython(device=1)
    b = rt.CudaPython(device=0)
    host = np.arange(4, dtype=np.float32)
    with a.active():
        ptr = a.malloc(host.nbytes)
    with b.active():
        assert fake.current_device() == 0
    with a.active():
        assert fake.current_device() == 1
        second = a.malloc(host.nbytes)
        a.htod(ptr, host)
    assert fake.owner[ptr] == 1 and fake.owner[second] == 1


def test_pycuda_stream_is_destroyed_inside_its_context_with_fake_cuda(tmp_path, monkeypatch, pycuda_fake):
    """Issue 28 item 7: pycuda destroys a Stream when its last reference goes (cuStreamDestroy), which
    needs the context current; close() dropped it after popping the context."""
    drv = pycuda_fake
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(drv.mem, drv.require))
    be = open_backend(_engine(tmp_path))
    be.infer(_images(1))
    be.close()
    assert drv.stream_deaths == [True] and drv.current() is None
