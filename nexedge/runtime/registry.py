"""The inference backends and the options each one takes: one table, so no option is passed by hand.

Every backend declares its name, the file suffixes it opens and its options (type, default,
help, and the command-line flag that sets it). :func:`nexedge.runtime.open_backend`,
``nexedge-daemon --check-config``, ``nexedge line load`` and the CLIs check options against the
backend that will open the file, so a wrong option is a clear error at check time, never a
``TypeError`` at start. A daemon config may give options per backend::

    model:
      options:
        onnxruntime: {intra_threads: 2}
        tensorrt: {device: 0}

or flat (``{intra_threads: 2}``), which then apply only to the backend of ``model.path``.

Python 3.8, no torch; nothing here imports a backend library.
"""

import importlib
import os
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple


class Option(NamedTuple):
    name: str
    types: Tuple[type, ...]
    default: Any = None
    help: str = ""
    choices: Tuple[Any, ...] = ()
    flag: str = ""  # the generic command-line flag that sets it (--threads, --crops, --providers)


class BackendSpec(NamedTuple):
    name: str
    suffixes: Tuple[str, ...]
    factory: str  # "module:Class"
    options: Tuple[Option, ...]
    #: Why generic flags it has no option for do not apply (shown in the error).
    note: str = ""
    #: Keyword arguments callers inside nexedge pass besides the options (never from a config).
    internal: Tuple[str, ...] = ()

    def option(self, name: str) -> Optional[Option]:
        return next((o for o in self.options if o.name == name), None)


_CROPS = ("center", "five", "ten")
_MAX_BATCH = Option("max_batch", (int,), None, "largest batch in images (default: the card's graph.max_batch)")
_VERIFY = Option("verify", (bool,), True, "refuse an artifact whose sha256 does not match its card")

BACKENDS: Dict[str, BackendSpec] = {
    "onnxruntime": BackendSpec(
        "onnxruntime", (".onnx",), "nexedge.runtime.onnxrt:OnnxRuntimeBackend", (
            Option("intra_threads", (int,), None, "intra-op threads (default: usable CPUs, at most 4)",
                   flag="--threads"),
            Option("inter_threads", (int,), 1, "inter-op threads"),
            Option("providers", (str, list, tuple), None, "execution providers: cpu, cuda, tensorrt (comma list)",
                   flag="--providers"),
            _MAX_BATCH,
            Option("crop_mode", (str,), None, "host crop mode of a host-crop model", _CROPS, flag="--crops"),
            _VERIFY,
        ), internal=("card",)),
    "tensorrt": BackendSpec(
        "tensorrt", (".engine", ".plan"), "nexedge.runtime.tensorrt:TensorRTBackend", (
            Option("device", (int,), 0, "CUDA device index"),
            _MAX_BATCH,
            _VERIFY,
        ), note="a TensorRT engine's crops, threads and batch profile are fixed when it is built; see "
                "nexedge build-engine",
        internal=("card",)),
    "torch": BackendSpec(
        "torch", (".pt", ".pth"), "nexedge.runtime.torch_backend:TorchBackend", (
            Option("device", (str,), "cpu", "torch device, e.g. cpu or cuda:0"),
            Option("threads", (int,), None, "torch intra-op threads", flag="--threads"),
            _MAX_BATCH,
            Option("crop_mode", (str,), None, "host crop mode", _CROPS, flag="--crops"),
            _VERIFY,
        )),
}
def backend_names() -> Tuple[str, ...]:
    return tuple(BACKENDS)


def get(name: str) -> BackendSpec:
    """The backend called ``name``; ValueError naming the known ones (never a default backend)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def backend_for(path: str) -> BackendSpec:
    """The backend that opens ``path``, by suffix; ValueError naming the accepted suffixes."""
    ext = os.path.splitext(str(path))[1].lower()
    for spec in BACKENDS.values():
        if ext in spec.suffixes:
            return spec
    known = ", ".join(s for spec in BACKENDS.values() for s in spec.suffixes)
    raise ValueError(f"cannot tell which backend runs {path!r} (suffix {ext!r}); expected one of {known}")


def _type_ok(value: Any, types: Tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, types)


def validate_options(backend: str, options: Optional[Mapping[str, Any]], where: str = "options",
                     internal: bool = False) -> Dict[str, Any]:
    """``options`` checked against backend ``backend``: every name declared, every value of the
    declared type and among the choices; a None value means "not set" and is dropped. ValueError
    naming the option, the backend and what it takes. ``internal``: also accept the backend's
    internal keywords (``card``)."""
    spec = get(backend)
    out: Dict[str, Any] = {}
    for name, value in dict(options or {}).items():
        if value is None:
            continue
        opt = spec.option(name)
        if opt is None:
            if internal and name in spec.internal:
                out[name] = value
                continue
            takes = ", ".join(o.name for o in spec.options)
            raise ValueError(f"{where}.{name}: not an option of the {spec.name} backend (it takes {takes})"
                             + (f"; {spec.note}" if spec.note else ""))
        if not _type_ok(value, opt.types):
            want = " or ".join(t.__name__ for t in opt.types)
            raise ValueError(f"{where}.{name}: {value!r}; expected {want} ({spec.name} backend: {opt.help})")
        if opt.choices and value not in opt.choices:
            raise ValueError(f"{where}.{name}: {value!r}; expected one of {', '.join(map(str, opt.choices))}")
        if isinstance(value, int) and not isinstance(value, bool) and name.endswith(("threads", "max_batch")) \
                and value < 1:
            raise ValueError(f"{where}.{name}: {value} must be a positive integer")
        out[name] = value
    return out


def is_per_backend(options: Optional[Mapping[str, Any]]) -> bool:
    """True when ``options`` is keyed by backend name (``{onnxruntime: {...}, tensorrt: {...}}``).
    A mix of backend names and option names is an error."""
    keys = set(options or {})
    named = keys & set(BACKENDS)
    if named and named != keys:
        raise ValueError(f"options mixes backend sections {sorted(named)} with plain options "
                         f"{sorted(keys - named)}; put every option under its backend "
                         f"({', '.join(BACKENDS)})")
    return bool(named)


def check_config_options(options: Optional[Mapping[str, Any]], path: str, where: str = "model.options") -> None:
    """Validate a config's options: each backend section against its backend, or flat options
    against the backend that opens ``path`` (no options: nothing to check)."""
    if not options:
        return
    if is_per_backend(options):
        for name, section in (options or {}).items():
            if section is not None and not isinstance(section, Mapping):
                raise ValueError(f"{where}.{name}: expected a mapping of {name} options, got {section!r}")
            validate_options(name, section, f"{where}.{name}")
    else:
        validate_options(backend_for(path).name, options, where)


def options_for(path: str, options: Optional[Mapping[str, Any]], where: str = "model.options") -> Dict[str, Any]:
    """The keyword options for opening ``path``: its backend's section of per-backend options (none
    given: {}), or the flat options, which must all be options of that backend."""
    spec = backend_for(path)
    if is_per_backend(options):
        return validate_options(spec.name, (options or {}).get(spec.name), f"{where}.{spec.name}")
    try:
        return validate_options(spec.name, options, where)
    except ValueError as e:
        raise ValueError(f"{e}. Options for several backends go under their names, e.g. "
                         f"{where}: {{onnxruntime: {{intra_threads: 2}}, tensorrt: {{device: 0}}}}") from None


def from_flags(backend: str, **flags: Any) -> Dict[str, Any]:
    """Options from generic command-line flags (``threads=2``, ``crop_mode="ten"``, ``providers=...``),
    each mapped to the option that declares it; a flag the backend has no option for is an error
    naming the backend (an unknown backend too)."""
    spec = get(backend)
    out: Dict[str, Any] = {}
    for key, value in flags.items():
        if value is None or value == "":
            continue
        flag = "--" + {"crop_mode": "crops"}.get(key, key)
        opt = next((o for o in spec.options if o.flag == flag), None)
        if opt is None:
            raise ValueError(f"{flag} {value!r} does not apply to the {spec.name} backend"
                             + (f": {spec.note}" if spec.note else ""))
        out[opt.name] = value
    return validate_options(backend, out, "flags")


def open_with(path: str, **kwargs: Any) -> Any:
    """Open ``path`` with its backend after checking ``kwargs`` against the backend's options."""
    spec = backend_for(path)
    opts = validate_options(spec.name, kwargs, "options", internal=True)
    module, cls = spec.factory.split(":")
    return getattr(importlib.import_module(module), cls)(path, **opts)
