"""The inference backends, found in :mod:`nexedge.runtime.backends`, and the options each one takes.

Every module in ``nexedge/runtime/backends/`` is one backend: it declares a module-level
``SPEC = BackendSpec(...)`` (its name, the file suffixes it opens, its options with the command-line
flag that sets each, the libraries it needs, its pip extra, a one-line summary) beside the backend
class. :func:`backends` discovers them; there is no hand-kept table. Everything that names backends
is generated from the specs: :func:`nexedge.runtime.open_backend`, ``nexedge bench --backend``,
``nexedge-daemon --check-config``, ``model.backend`` / ``model.options`` validation, ``nexedge line
load``, the load probe's preloads and the library versions of the machine report.

A backend opens its ``suffixes`` by default (``auto``); a backend chosen by name may also open its
``also_opens`` suffixes (e.g. a second backend for ``.onnx`` files). A daemon config may give
options per backend::

    model:
      backend: auto        # or a backend's name
      options:
        onnxruntime: {intra_threads: 2}
        tensorrt: {device: 0}

or flat (``{intra_threads: 2}``), which then apply only to the backend of ``model.path``.

Python 3.8, no torch; discovery imports the backend modules, which import no backend library at
module level (tools/check_no_torch.py and tests/test_backends.py check it).
"""

import importlib
import importlib.util
import os
import pkgutil
import sys
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple


class Option(NamedTuple):
    name: str
    types: Tuple[type, ...]
    default: Any = None
    help: str = ""
    choices: Tuple[Any, ...] = ()
    flag: str = ""  # the generic command-line flag that sets it (--threads, --crops, --providers)


class BackendSpec(NamedTuple):
    """What a backend module declares as ``SPEC``."""

    name: str
    #: Suffixes it opens by default (``auto``); no two backends share one.
    suffixes: Tuple[str, ...]
    #: The backend class, by name, in the spec's module.
    factory: str
    options: Tuple[Option, ...]
    #: Why generic flags it has no option for do not apply (shown in the error).
    note: str = ""
    #: Keyword arguments callers inside nexedge pass besides the options (never from a config).
    internal: Tuple[str, ...] = ()
    #: Further suffixes it opens when chosen by name (``--backend``, ``model.backend``).
    also_opens: Tuple[str, ...] = ()
    #: Modules it imports to run (:func:`missing` names those not installed).
    requires: Tuple[str, ...] = ()
    #: pip distributions whose installed version the machine report records, in order of preference.
    packages: Tuple[str, ...] = ()
    #: ``"module:attribute"`` read for the version when no distribution is installed (JetPack's apt TensorRT).
    version: str = ""
    #: The nexedge extra that installs ``requires`` (``pip install 'nexedge[EXTRA]'``); "" = always installed.
    extra: str = ""
    #: One line for ``--backend`` help and the backend table.
    summary: str = ""
    #: What to do instead when ``--backend NAME`` cannot run a file (``nexedge bench``).
    hint: str = ""
    #: Modules the daemon has loaded already, imported by the load probe before it measures a model's
    #: memory (so the library's own memory does not count against the model's budget).
    preload: Tuple[str, ...] = ()
    #: Meant for the line daemon (its help texts name these suffixes); False for reference backends.
    line: bool = True
    #: Name of a function in the spec's module, ``f(options) -> bool``: the model runs on the CPU only
    #: (the load probe then caps its address space); "" = never assumed.
    cpu_only: str = ""
    #: The module that declared it (set by discovery).
    module: str = ""

    def option(self, name: str) -> Optional[Option]:
        return next((o for o in self.options if o.name == name), None)

    def opens(self) -> Tuple[str, ...]:
        """Every suffix it opens when chosen by name."""
        return self.suffixes + self.also_opens


#: Host crop modes (nexedge.card.CROP_MODES), for backends' ``crop_mode`` options.
CROPS = ("center", "five", "ten")
#: Options most backends share.
MAX_BATCH = Option("max_batch", (int,), None, "largest batch in images (default: the card's graph.max_batch)")
VERIFY = Option("verify", (bool,), True, "refuse an artifact whose sha256 does not match its card")
#: The value of ``model.backend`` / ``--backend`` that picks the backend by suffix.
AUTO = "auto"

_FOUND: Optional[Dict[str, BackendSpec]] = None


def discover(package: str = "nexedge.runtime.backends") -> Dict[str, BackendSpec]:
    """``{name: spec}`` of every module in ``package`` that declares a ``SPEC`` (in module-name order).
    ValueError for a spec that is malformed, named differently from its module, or claims a
    suffix another backend opens by default."""
    pkg = importlib.import_module(package)
    found: Dict[str, BackendSpec] = {}
    owner: Dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        modname = f"{package}.{info.name}"
        module = importlib.import_module(modname)
        spec = getattr(module, "SPEC", None)
        if not isinstance(spec, BackendSpec):
            raise ValueError(f"{modname}: a backend module must declare SPEC = BackendSpec(...), got {spec!r}")
        if spec.name != info.name:
            raise ValueError(f"{modname}: SPEC.name {spec.name!r} differs from its module name {info.name!r}")
        if not isinstance(getattr(module, spec.factory, None), type):
            raise ValueError(f"{modname}: SPEC.factory {spec.factory!r} is not a class of that module")
        for s in spec.opens():
            if not s.startswith(".") or s != s.lower():
                raise ValueError(f"{modname}: suffix {s!r}; expected a lower-case suffix like '.onnx'")
        for s in spec.suffixes:
            if s in owner:
                raise ValueError(f"{modname}: suffix {s!r} is opened by default by the {owner[s]} backend already; "
                                 f"list it in also_opens (opened when {spec.name} is chosen by name)")
            owner[s] = spec.name
        found[spec.name] = spec._replace(module=modname)
    return found


def backends() -> Dict[str, BackendSpec]:
    """``{name: spec}`` of the backends in ``nexedge/runtime/backends/``, discovered once."""
    global _FOUND
    if _FOUND is None:
        _FOUND = discover()
    return _FOUND


def backend_names() -> Tuple[str, ...]:
    return tuple(backends())


def get(name: str) -> BackendSpec:
    """The backend called ``name``; ValueError naming the known ones (never a default backend)."""
    found = backends()
    if name not in found:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(found)}")
    return found[name]


def _suffix(path: str) -> str:
    return os.path.splitext(str(path))[1].lower()


def backend_for(path: str) -> BackendSpec:
    """The backend that opens ``path`` by default, by suffix; ValueError naming the accepted suffixes."""
    ext = _suffix(path)
    for spec in backends().values():
        if ext in spec.suffixes:
            return spec
    known = ", ".join(s for spec in backends().values() for s in spec.suffixes)
    raise ValueError(f"cannot tell which backend runs {path!r} (suffix {ext!r}); expected one of {known}")


def choose(path: str, backend: Optional[str] = AUTO, where: str = "backend") -> BackendSpec:
    """The backend that runs ``path``: by suffix for ``auto`` (or None), else the named one, which must
    open that suffix. ValueError naming the backend, the file and what it opens."""
    if backend in (None, "", AUTO):
        return backend_for(path)
    if backend not in backends():
        raise ValueError(f"{where}: unknown backend {backend!r}; expected {AUTO} or one of "
                         f"{', '.join(backends())}")
    spec = backends()[backend]
    if _suffix(path) not in spec.opens():
        raise ValueError(f"{where}: the {spec.name} backend cannot run {path!r}; it opens "
                         f"{', '.join(spec.opens())} files")
    return spec


def missing(name: str) -> Optional[str]:
    """None when backend ``name``'s libraries are installed, else a message naming the missing one and
    the pip command that installs it. Looks for the modules without importing them."""
    spec = get(name)
    for mod in spec.requires:
        try:
            found = mod in sys.modules or importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            how = f"pip install 'nexedge[{spec.extra}]'" if spec.extra else "pip install nexedge"
            return f"{mod} is not installed, which the {spec.name} backend needs ({how})"
    return None


def version(spec: BackendSpec) -> Optional[str]:
    """Installed version of the backend's library: its first installed pip distribution, else the
    ``version`` attribute of its module when that module is imported already (never imported here)."""
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    for dist in spec.packages:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    if spec.version:
        mod, attr = spec.version.split(":")
        if mod in sys.modules:
            return getattr(sys.modules[mod], attr, None)
    return None


def describe() -> str:
    """One line per backend: name, suffixes (chosen by name: also ...), summary; for --help texts."""
    lines = []
    for spec in backends().values():
        opens = ", ".join(spec.suffixes)
        if spec.also_opens:
            opens += ("; by name also " if opens else "by name: ") + ", ".join(spec.also_opens)
        lines.append(f"  {spec.name:<12} {opens}: {spec.summary}")
    return "\n".join(lines)


def suffix_text(line: bool = False) -> str:
    """The suffixes the backends open by default, for help texts: ``.onnx, .engine, .plan, .pt, .pth``;
    ``line``: only those of the backends meant for the line daemon."""
    return ", ".join(s for spec in backends().values() if spec.line or not line for s in spec.suffixes)


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
    named = keys & set(backends())
    if named and named != keys:
        raise ValueError(f"options mixes backend sections {sorted(named)} with plain options "
                         f"{sorted(keys - named)}; put every option under its backend "
                         f"({', '.join(backends())})")
    return bool(named)


def check_config_options(options: Optional[Mapping[str, Any]], path: str, where: str = "model.options",
                         backend: Optional[str] = AUTO) -> None:
    """Validate a config's options: each backend section against its backend, or flat options
    against the backend that runs ``path`` (:func:`choose`; no options: nothing to check)."""
    if not options:
        return
    if is_per_backend(options):
        for name, section in (options or {}).items():
            if section is not None and not isinstance(section, Mapping):
                raise ValueError(f"{where}.{name}: expected a mapping of {name} options, got {section!r}")
            validate_options(name, section, f"{where}.{name}")
    else:
        validate_options(choose(path, backend).name, options, where)


def options_for(path: str, options: Optional[Mapping[str, Any]], where: str = "model.options",
                backend: Optional[str] = AUTO) -> Dict[str, Any]:
    """The keyword options for opening ``path`` with ``backend`` (:func:`choose`): that backend's section
    of per-backend options (none given: {}), or the flat options, which must all be options of it."""
    spec = choose(path, backend)
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


def open_with(path: str, backend: Optional[str] = AUTO, **kwargs: Any) -> Any:
    """Open ``path`` with ``backend`` (:func:`choose`) after checking ``kwargs`` against its options."""
    spec = choose(path, backend)
    opts = validate_options(spec.name, kwargs, "options", internal=True)
    return getattr(importlib.import_module(spec.module), spec.factory)(path, **opts)
