"""How close to the hardware's limit does inference run?

Two measurements in the same run, on the same threads:

* a GEMM roofline proxy: square float32 matrix products through numpy's BLAS
  and through ONNX Runtime's own MatMul kernel (MLAS, the kernels its Conv
  uses), plus an INT8 ``MatMulInteger`` (uint8 x int8, what U8S8 Q/DQ models
  run); the best sustained GFLOP/s (GOP/s for INT8) is the practical peak;
* the model's multiply-accumulate work per image, counted from the ONNX
  graph: Conv, ConvTranspose, Gemm, MatMul and their quantized forms, with
  shapes from ONNX shape inference at batch 1 (2 FLOPs per MAC).

Achieved GFLOP/s = FLOPs per image x images/s; its ratio to the GEMM peak is
the utilisation the benchmark reports. Needs ``onnx`` (the ``train`` extra)
only for the ONNX parts; Python 3.8, no torch.
"""

import time
from typing import Any, Dict, List, Optional

import numpy as np

from nexedge.export.onnx_check import onnx_attr

CONV_OPS = ("Conv", "ConvInteger", "QLinearConv", "ConvTranspose")
MATMUL_OPS = ("MatMul", "MatMulInteger", "QLinearMatMul", "Gemm")


def _time_op(fn: Any, flops: float, seconds: float, min_reps: int = 3) -> Dict[str, float]:
    fn()  # warm-up: first call pays for allocation and thread pool start
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "best_gflops": flops / times[0] / 1e9,
        "median_gflops": flops / times[len(times) // 2] / 1e9,
        "reps": len(times),
    }


def numpy_gemm(n: int = 1024, seconds: float = 1.0) -> Dict[str, Any]:
    """float32 n x n @ n x n through numpy's BLAS (thread count: the BLAS's own setting)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    r = _time_op(lambda: np.matmul(a, b, out=out), 2.0 * n ** 3, seconds)
    r.update(kernel="numpy BLAS fp32", n=n)
    return r


def _matmul_model(n: int, int8: bool):  # type: ignore[no-untyped-def]
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    if int8:
        w = rng.integers(-127, 128, size=(n, n), dtype=np.int8)
        x = helper.make_tensor_value_info("x", TensorProto.UINT8, [n, n])
        y = helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])
        node = helper.make_node("MatMulInteger", ["x", "w"], ["y"])
    else:
        w = rng.standard_normal((n, n), dtype=np.float32)
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "gemm", [x], [y], initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def ort_gemm(n: int = 1024, threads: Optional[int] = None, int8: bool = False,
             seconds: float = 1.0) -> Dict[str, Any]:
    """n x n MatMul (fp32) or MatMulInteger (uint8 x int8) in an ONNX Runtime session
    configured like the inference backend (explicit threads, no spinning)."""
    import onnxruntime as ort

    from nexedge.runtime.backends.onnxruntime import session_options

    sess = ort.InferenceSession(_matmul_model(n, int8), sess_options=session_options(threads),
                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    if int8:
        x = rng.integers(0, 256, size=(n, n), dtype=np.uint8)
    else:
        x = rng.standard_normal((n, n), dtype=np.float32)
    r = _time_op(lambda: sess.run(None, {"x": x}), 2.0 * n ** 3, seconds)
    r.update(kernel="onnxruntime MatMulInteger u8s8" if int8 else "onnxruntime MatMul fp32", n=n,
             threads=sess.get_session_options().intra_op_num_threads)
    return r


def measure_peaks(n: int = 1024, threads: Optional[int] = None, seconds: float = 1.0) -> Dict[str, Any]:
    """All GEMM measurements; ``fp32_peak`` / ``int8_peak`` are the best sustained rates seen."""
    rows = [numpy_gemm(n, seconds)]
    notes = []
    try:
        rows.append(ort_gemm(n, threads, int8=False, seconds=seconds))
        rows.append(ort_gemm(n, threads, int8=True, seconds=seconds))
    except ImportError as e:
        notes.append(f"ONNX Runtime GEMM skipped: {e}")
    fp32 = max(r["best_gflops"] for r in rows if "fp32" in r["kernel"])
    int8 = [r["best_gflops"] for r in rows if "u8s8" in r["kernel"]]
    return {"n": n, "rows": rows, "fp32_peak": fp32, "int8_peak": max(int8) if int8 else None, "notes": notes}


# -- model FLOPs ------------------------------------------------------------

def _dims(vi: Any) -> Optional[List[int]]:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    out = []
    for d in t.shape.dim:
        if not d.HasField("dim_value"):
            return None
        out.append(int(d.dim_value))
    return out


def model_flops(path: str, batch: int = 1) -> Dict[str, Any]:
    """FLOPs (2 x MACs) of one forward pass with every graph input's first axis set to ``batch``.

    Returns ``flops``, a per-op-type breakdown, and the names of counted nodes
    whose shapes inference could not resolve (``unresolved``; their work is missing).
    """
    import onnx
    from onnx import shape_inference

    model = onnx.load(path)
    init_names = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims):
            dims[0].ClearField("dim_param")
            dims[0].dim_value = batch
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes: Dict[str, List[int]] = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        d = _dims(vi)
        if d is not None:
            shapes[vi.name] = d
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)

    by_op: Dict[str, float] = {}
    unresolved = []
    total = 0.0
    for node in model.graph.node:
        if node.op_type not in CONV_OPS + MATMUL_OPS:
            continue
        f = _node_flops(node, shapes)
        if f is None:
            unresolved.append(node.name or node.op_type)
            continue
        total += f
        by_op[node.op_type] = by_op.get(node.op_type, 0.0) + f
    return {"flops": total, "batch": batch, "by_op": by_op, "unresolved": unresolved}


def _node_flops(node: Any, shapes: Dict[str, List[int]]) -> Optional[float]:
    op = node.op_type
    if op in CONV_OPS:
        # QLinearConv inputs: x, x_scale, x_zp, w, ...; the others: x, w, ...
        w_name = node.input[3] if op == "QLinearConv" else node.input[1]
        out = shapes.get(node.output[0])
        w = shapes.get(w_name)
        if out is None or w is None or len(w) < 3:
            return None
        kernel = 1
        for k in w[2:]:
            kernel *= k
        if op == "ConvTranspose":
            x = shapes.get(node.input[0])
            if x is None:
                return None
            n_in = 1
            for d in x[2:]:
                n_in *= d
            return 2.0 * x[0] * x[1] * n_in * w[1] * kernel  # each input pixel scatters into Cout/g x k
        n_out = 1
        for d in out:
            n_out *= d
        return 2.0 * n_out * w[1] * kernel  # w[1] = Cin / group
    # MatMul family: A [..., M, K] x B [..., K, N]
    a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
    if a is None or out is None or not a:
        return None
    k = a[-1]
    if op == "Gemm" and int(onnx_attr(node, "transA", 0)):
        k = a[0]
    n_out = 1
    for d in out:
        n_out *= d
    return 2.0 * n_out * k


def flops_per_image(path: str, host_crops: int = 1) -> Dict[str, Any]:
    """FLOPs per *image*: a host-crop graph sees one crop per row, so pass the number of
    crops per image (1 for in-graph crop models, whose batch axis is already images)."""
    r = model_flops(path, batch=1)
    k = int(host_crops)
    r["crops_per_image_rows"] = k
    r["flops_per_image"] = r["flops"] * k
    return r


def utilisation(flops_image: float, images_per_s: float, peak_gflops: Optional[float]) -> Dict[str, Any]:
    """Achieved GFLOP/s and its fraction of ``peak_gflops``."""
    achieved = flops_image * images_per_s / 1e9
    return {"achieved_gflops": achieved,
            "fraction_of_peak": achieved / peak_gflops if peak_gflops else None}
