"""The CUDA device an engine is built for and tied to: name, compute capability, SM count, memory and
Jetson board (cuda-python, else pycuda), and what to say when the driver and cuda-python disagree."""

from typing import Any, NamedTuple, Tuple

GiB = 1 << 30

JETSON_MODEL_FILE = "/proc/device-tree/model"


class DeviceInfo(NamedTuple):
    """What an engine is tied to. ``name`` alone is not enough: cudaGetDeviceProperties says "Orin"
    for AGX Orin, Orin NX and Orin Nano alike; they differ in SM count and memory."""

    name: str  # e.g. "Orin", "NVIDIA GeForce RTX 4090"
    compute_capability: Tuple[int, int]
    sm_count: int = 0  # multiProcessorCount
    total_mem_gib: int = 0  # totalGlobalMem, rounded
    board: str = ""  # Jetson module (/proc/device-tree/model), e.g. "NVIDIA Jetson Orin Nano Developer Kit"


def jetson_board(path: str = JETSON_MODEL_FILE) -> str:
    """The Jetson module name from the device tree ("" elsewhere)."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").strip("\x00 \n")
    except OSError:
        return ""


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}" if v else "none"


# cuda-python per platform, as setup.py's `trt` extra pins it (the wheels pip resolves: 13.x needs a
# 580+ driver and has no cuda.cudart; there is no aarch64 wheel for 11.4, 11.5-11.8 cp38 ones exist).
CUDA_PYTHON_PINS = ("JetPack 5 (CUDA 11.4): cuda-python>=11.5,<12; JetPack 6 (CUDA 12.2/12.6): "
                    "cuda-python>=12.6,<12.7; x86: the CUDA major of your driver, e.g. cuda-python>=12,<13")


def cuda_mismatch_message(rt: Any, err: Any, what: str) -> str:
    """Explain a CUDA runtime error at start-up: driver vs cuda-python versions and the pins."""
    try:
        import importlib.metadata as md

        pkg = next((f"{d} {md.version(d)}" for d in ("cuda-python", "cuda-bindings") if _has_dist(md, d)), "")
    except ImportError:  # Python 3.7 metadata backport not needed on 3.8+
        pkg = ""
    drv = rt.cudaDriverGetVersion()
    rtv = rt.cudaRuntimeGetVersion()
    driver = _cuda_version(int(drv[1])) if drv[0] == rt.cudaError_t.cudaSuccess else "unknown"
    runtime = _cuda_version(int(rtv[1])) if rtv[0] == rt.cudaError_t.cudaSuccess else "unknown"
    msg = f"{what} failed: {err}. CUDA driver supports CUDA {driver}; cuda-python ({pkg or 'version unknown'}) " \
          f"was built for CUDA {runtime}."
    if driver == "none":
        msg += " No NVIDIA driver was found (is this a GPU machine, and is the driver loaded?)."
    elif runtime != "unknown" and driver != "unknown" and runtime.split(".")[0] != driver.split(".")[0]:
        msg += f" Install the cuda-python matching the driver's CUDA {driver.split('.')[0]}.x."
    elif "InsufficientDriver" in str(err):
        msg += " The driver is older than this cuda-python needs: install an older cuda-python."
    return msg + " Pins: " + CUDA_PYTHON_PINS


def _has_dist(md: Any, name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def device_info(device: int = 0) -> DeviceInfo:
    """Name, compute capability, SM count, memory and Jetson board of CUDA device ``device``
    (cuda-python, else pycuda). A driver/cuda-python mismatch raises a RuntimeError that says so."""
    board = jetson_board(JETSON_MODEL_FILE)
    try:
        from nexedge.runtime.backends.tensorrt import _import_cudart

        rt = _import_cudart()
    except ImportError:
        import pycuda.driver as cuda

        cuda.init()
        d = cuda.Device(device)
        attr = cuda.device_attribute
        return DeviceInfo(d.name(), tuple(d.compute_capability()),  # type: ignore[arg-type]
                          int(d.get_attribute(attr.MULTIPROCESSOR_COUNT)), round(d.total_memory() / GiB), board)
    err, props = rt.cudaGetDeviceProperties(device)
    if err != rt.cudaError_t.cudaSuccess:
        raise RuntimeError(cuda_mismatch_message(rt, err, f"cudaGetDeviceProperties({device})"))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(name.rstrip("\x00"), (int(props.major), int(props.minor)), int(props.multiProcessorCount),
                      round(int(props.totalGlobalMem) / GiB), board)
