"""ONNX Runtime backend (CPU here; CUDA or TensorRT execution providers where present).

Thread counts are set explicitly and spinning is off, so several sessions in
one process (several models, several daemons' workers) share a small CPU
instead of starving each other. Python 3.8, no torch.
"""

import time
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from nexedge import preprocess as pp
from nexedge.card import ModelCard, load_card
from nexedge.runtime.base import Backend, BackendError
from nexedge.runtime.registry import CROPS, MAX_BATCH, VERIFY, BackendSpec, Option

SPEC = BackendSpec(
    "onnxruntime", (".onnx",), "OnnxRuntimeBackend", (
        Option("intra_threads", (int,), None, "intra-op threads (default: usable CPUs, at most 4)", flag="--threads"),
        Option("inter_threads", (int,), 1, "inter-op threads"),
        Option("providers", (str, list, tuple), None, "execution providers: cpu, cuda, tensorrt (comma list)",
               flag="--providers"),
        MAX_BATCH,
        Option("crop_mode", (str,), None, "host crop mode of a host-crop model", CROPS, flag="--crops"),
        VERIFY,
    ), internal=("card",), requires=("onnxruntime",),
    packages=("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml"), version="onnxruntime:__version__",
    summary="ONNX Runtime (CPU; CUDA or TensorRT execution providers where present)",
    hint="export to ONNX first (nexedge export) and bench the .onnx file",
    preload=("onnxruntime",), cpu_only="runs_on_cpu_only")

#: Short names accepted for ``providers`` and the ORT provider each stands for.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
#: Default preference when ``providers`` is not given: GPU first where present, CPU always last.
DEFAULT_PROVIDER_ORDER = ("CUDAExecutionProvider", "CPUExecutionProvider")


def resolve_providers(requested: Union[None, str, Sequence[str]], available: Sequence[str]) -> List[str]:
    """Turn ``None`` / ``"cpu"`` / ``"tensorrt,cuda"`` / a list into ORT provider names present here.

    ``None`` picks the available ones of :data:`DEFAULT_PROVIDER_ORDER` (TensorRT EP only on
    request: it builds engines on first run, which a line daemon should do deliberately).
    An explicitly requested provider that is missing is an error, never a silent CPU fallback.
    """
    if requested is None:
        return [p for p in DEFAULT_PROVIDER_ORDER if p in available]
    names = requested.split(",") if isinstance(requested, str) else list(requested)
    out = []
    for raw in names:
        name = PROVIDER_ALIASES.get(raw.strip().lower(), raw.strip())
        if name not in available:
            raise ValueError(
                f"ONNX Runtime provider {raw!r} is not available here; available: {', '.join(available)} "
                f"(short names: {', '.join(sorted(PROVIDER_ALIASES))})"
            )
        out.append(name)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


def runs_on_cpu_only(options: Dict[str, object]) -> bool:
    """True when ``options`` (this backend's) leave the CPU provider only on this machine."""
    import onnxruntime as ort

    return resolve_providers(options.get("providers"), ort.get_available_providers()) == ["CPUExecutionProvider"]


def default_threads() -> int:
    """Intra-op threads when not given: the running command's ``--threads``
    (:func:`nexedge.threads.configured`), else the CPUs this process may use, at most 4."""
    from nexedge import threads

    return threads.configured() or max(1, min(4, threads.usable_cores()))


def session_options(intra_threads: Optional[int] = None, inter_threads: int = 1):  # type: ignore[no-untyped-def]
    """SessionOptions with explicit thread counts and spinning turned off."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(intra_threads or default_threads())
    so.inter_op_num_threads = int(inter_threads)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


class OnnxRuntimeBackend(Backend):
    """Runs a ``.onnx`` model (host-crop fp32/int8, or in-graph crops) described by its card."""

    name = "onnxruntime"

    def __init__(
        self,
        path: str,
        card: Optional[ModelCard] = None,
        intra_threads: Optional[int] = None,
        inter_threads: int = 1,
        providers: Union[None, str, Sequence[str]] = None,
        max_batch: Optional[int] = None,
        crop_mode: Optional[str] = None,
        verify: bool = True,
    ) -> None:
        import onnxruntime as ort

        self.session = None
        card = card if card is not None else load_card(path, verify=verify)
        super().__init__(card, max_batch)
        if crop_mode:
            if self.crops != "host":
                raise ValueError(f"crop_mode {crop_mode!r} given, but {path} does its crops in the graph "
                                 f"({self.crops}); only host-crop models take a crop mode")
            self.crop_mode, self.k = crop_mode, pp.n_crops(crop_mode)
        self.path = path
        self.providers = resolve_providers(providers, ort.get_available_providers())
        so = session_options(intra_threads, inter_threads)
        self.session = ort.InferenceSession(path, sess_options=so, providers=self.providers)
        self._check_signature()

    def _check_signature(self) -> None:
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise BackendError(f"{self.path}: expected one input, model has {[i.name for i in inputs]}")
        inp = inputs[0]
        want_name = self.card.graph.get("input_name") or inp.name
        if inp.name != want_name:
            raise BackendError(f"{self.path}: card names input {want_name!r}, model input is {inp.name!r}")
        want_type = "tensor(float)" if self.crops == "host" else "tensor(uint8)"
        if inp.type != want_type:
            raise BackendError(
                f"{self.path}: card says crops={self.crops!r} which needs input {want_type}, model takes {inp.type}"
            )
        self.input_name = inp.name
        outs = [o.name for o in self.session.get_outputs()]
        if self.crops == "host":
            self.output_name = outs[0]
        else:
            # Score from the mean logits (float64 on the host); graphs from before that output existed: probs.
            self.graph_output = "logits" if "logits" in outs else "probs"
            if self.graph_output not in outs:
                raise BackendError(f"{self.path}: in-graph model must output 'logits' (or 'probs'), has {outs}")
            self.output_name = self.graph_output

    def _run(self, feed: np.ndarray, timings: Dict[str, float]) -> np.ndarray:
        if self.session is None:
            raise BackendError(f"{self.path}: backend is closed")
        t0 = time.perf_counter()
        try:
            out = self.session.run([self.output_name], {self.input_name: feed})[0]
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"{self.path}: ONNX Runtime failed on input {feed.shape}: {e}") from e
        timings["inference"] = time.perf_counter() - t0
        return out

    def _run_host(self, x: np.ndarray, timings: Dict[str, float]) -> np.ndarray:
        return self._run(x, timings)

    def _run_graph(self, images: np.ndarray, timings: Dict[str, float]) -> np.ndarray:
        return self._run(images, timings)

    def close(self) -> None:
        self.session = None
