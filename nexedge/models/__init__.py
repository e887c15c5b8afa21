"""The architecture registry: ``create_model(name, num_classes, ...)`` as in timm, and what each
architecture declares (:class:`ArchSpec`).

Every module in ``nexedge/models/archs/`` declares ``ARCHS = (ArchSpec(...), ...)``: each
architecture's name, family and one-line summary, default input size (``--resize``/``--crop``),
input normalisation, the pretrained weights it has and where they come from, and its factory as a
``"module:function"`` string. :func:`arch_specs` discovers those modules with pkgutil (there is no
hand-kept list); the declaration modules import no torch, so ``nexedge train --help`` lists the
architectures without loading it. A factory is imported only when :func:`create_model` builds the
model; it is called as ``factory(name, num_classes=N, pretrained=P, **kw)``.

Generated from the specs: ``--arch`` choices and help (``nexedge train``, ``nexedge demo``),
``--pretrained`` validation (:func:`check_pretrained`), the trainer's default input size and the
card's mean/std (:func:`input_normalization`), and every "each architecture" test.

:func:`register` still registers a factory at run time (out-of-tree code, tests); its
``(name, mean, std)`` signature is kept.
"""

import importlib
import os
import pkgutil
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from nexedge.card import IMAGENET_MEAN, IMAGENET_STD  # a spec's default normalisation

#: ``--pretrained`` values that mean "no weights".
NO_WEIGHTS = ("none", "")


class Weights(NamedTuple):
    """A named set of pretrained weights an architecture can start from (``--pretrained NAME``)."""

    name: str
    #: Where they come from, for help and error texts ("torchvision: downloaded into the torch hub cache").
    source: str
    #: True when they load with no network (shipped in an installed package).
    offline: bool = False


class ArchSpec(NamedTuple):
    """What a module in ``nexedge/models/archs/`` declares for one architecture."""

    name: str
    #: Architectures of one family share a summary line in ``--arch`` help (resnet, vgg, stn, ...).
    family: str
    #: One line: what it is and when to use it.
    summary: str
    #: ``"module:function"`` (imported only to build) or, from :func:`register`, a callable.
    factory: Union[str, Callable[..., Any]]
    #: Named pretrained weights (``--pretrained imagenet``); none: it trains from scratch only.
    weights: Tuple[Weights, ...] = ()
    #: Accepts ``--pretrained PATH`` (a state dict of the same architecture).
    weights_file: bool = True
    #: Input normalisation on [0, 1] RGB its pretrained weights expect; written into the card.
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    #: Default ``--resize`` and ``--crop`` (height, width) when the command line gives none.
    resize: Tuple[int, int] = (72, 72)
    crop: Tuple[int, int] = (64, 64)
    #: The factory needs ``input_size`` (the crop) rather than accepting and ignoring it (STN).
    needs_input_size: bool = False
    #: The module that declared it (set by discovery).
    module: str = ""

    def weight_names(self) -> Tuple[str, ...]:
        return tuple(w.name for w in self.weights)

    def pretrained_text(self) -> str:
        """What ``--pretrained`` takes for it: ``none, imagenet (SOURCE) or PATH to a state dict``."""
        items = ["none"] + [f"{w.name} ({w.source})" for w in self.weights]
        if self.weights_file:
            items.append("PATH to a state dict")
        return ", ".join(items[:-1]) + " or " + items[-1] if len(items) > 1 else items[0]


_FOUND: Optional[Dict[str, ArchSpec]] = None
_SKIPPED: Dict[str, str] = {}
_RUNTIME: Dict[str, ArchSpec] = {}


def discover(package: str = "nexedge.models.archs") -> Tuple[Dict[str, ArchSpec], Dict[str, str]]:
    """``({name: spec}, {module: why skipped})`` of the modules in ``package`` (module-name order).

    A module whose import fails for a missing package is skipped and reported, so one optional
    dependency never hides the other architectures; a module without ``ARCHS``, a spec that is not
    an :class:`ArchSpec`, a bad factory string or a name declared twice is a ValueError."""
    pkg = importlib.import_module(package)
    found: Dict[str, ArchSpec] = {}
    skipped: Dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        modname = f"{package}.{info.name}"
        try:
            module = importlib.import_module(modname)
        except ImportError as e:
            skipped[modname] = f"{type(e).__name__}: {e}"
            continue
        specs = getattr(module, "ARCHS", None)
        if not isinstance(specs, (tuple, list)) or not specs:
            raise ValueError(f"{modname}: an architecture module must declare ARCHS = (ArchSpec(...), ...), "
                             f"got {specs!r}")
        for spec in specs:
            if not isinstance(spec, ArchSpec):
                raise ValueError(f"{modname}: ARCHS holds {spec!r}; expected ArchSpec(...)")
            if not isinstance(spec.factory, str) or spec.factory.count(":") != 1:
                raise ValueError(f"{modname}: {spec.name}: factory {spec.factory!r}; expected 'module:function'")
            if spec.name in found:
                raise ValueError(f"{modname}: architecture {spec.name!r} is declared by {found[spec.name].module} "
                                 "already")
            found[spec.name] = spec._replace(module=modname, mean=tuple(float(v) for v in spec.mean),
                                             std=tuple(float(v) for v in spec.std))
    return found, skipped


def arch_specs() -> Dict[str, ArchSpec]:
    """``{name: spec}`` of every architecture: those in ``nexedge/models/archs/`` (discovered once),
    then those :func:`register`ed at run time."""
    global _FOUND
    if _FOUND is None:
        _FOUND, skipped = discover()
        _SKIPPED.update(skipped)
    out = dict(_FOUND)
    out.update(_RUNTIME)
    return out


def list_models() -> List[str]:
    return sorted(arch_specs())


def arch_spec(name: str) -> ArchSpec:
    """The spec of architecture ``name``; ValueError naming the known ones (and modules skipped)."""
    found = arch_specs()
    if name not in found:
        why = "".join(f"; {m} was skipped ({reason})" for m, reason in _SKIPPED.items())
        raise ValueError(f"unknown architecture {name!r}; available: {', '.join(sorted(found))}{why}")
    return found[name]


def register(
    name: str, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None, **fields: Any
) -> Callable[[Callable], Callable]:
    """Decorator: register a factory ``fn(num_classes, pretrained='none', **kw) -> nn.Module`` at run time
    (for code outside ``nexedge/models/archs/``; the architectures shipped with nexedge are declared there).

    ``mean``/``std``: the input normalisation its pretrained weights expect (default ImageNet's);
    ``fields``: further :class:`ArchSpec` fields (``summary``, ``weights``, ``resize``, ...).
    """

    def deco(fn: Callable) -> Callable:
        old = arch_specs().get(name)
        if old is not None and not (callable(old.factory) and getattr(old.factory, "__wrapped__", None) is fn):
            raise ValueError(f"model {name!r} registered twice")

        def factory(_name: str, **kw: Any) -> Any:
            return fn(**kw)

        factory.__wrapped__ = fn  # type: ignore[attr-defined]
        spec = ArchSpec(name, fields.pop("family", "registered"), fields.pop("summary", fn.__doc__ or name), factory,
                        module=getattr(fn, "__module__", ""), **fields)
        if mean is not None and std is not None:
            spec = spec._replace(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
        _RUNTIME[name] = spec
        return fn

    return deco


def factory_of(name: str) -> Callable[..., Any]:
    """The factory of ``name``, imported now (this is where torch loads); called as
    ``factory(name, num_classes=N, pretrained=P, **kw)``."""
    spec = arch_spec(name)
    if callable(spec.factory):
        return spec.factory
    mod, attr = spec.factory.split(":")
    return getattr(importlib.import_module(mod), attr)


def accepts(name: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The subset of ``kwargs`` that architecture ``name``'s factory takes (for the trainer's uniform call)."""
    import inspect

    fn = factory_of(name)
    params = inspect.signature(getattr(fn, "__wrapped__", fn)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def check_pretrained(name: str, pretrained: Optional[str]) -> None:
    """ValueError naming the value, the architecture and the weights it has, unless ``pretrained`` is
    ``none``, one of its named weights or (for an architecture that takes one) a state-dict path."""
    spec = arch_spec(name)
    value = "" if pretrained is None else str(pretrained)
    if value in NO_WEIGHTS or value in spec.weight_names():
        return
    looks_like_path = os.sep in value or "/" in value or os.path.splitext(value)[1] != "" or os.path.exists(value)
    if spec.weights_file and looks_like_path:
        return  # the factory checks the file (FileNotFoundError naming it)
    has = (f"{name} has {', '.join(spec.weight_names())} weights" if spec.weights
           else f"{name} has no pretrained weights")
    raise ValueError(f"--pretrained {value!r}: {has}; expected {spec.pretrained_text()}")


def input_normalization(name: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) on [0, 1] RGB that architecture ``name`` is trained with (ImageNet's unless declared)."""
    found = arch_specs()
    if name not in found:
        return IMAGENET_MEAN, IMAGENET_STD
    return found[name].mean, found[name].std


def create_model(name: str, num_classes: int, pretrained: str = "none", **kwargs):  # type: ignore[no-untyped-def]
    """Build architecture ``name`` with ``num_classes`` outputs (logits)."""
    arch_spec(name)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    check_pretrained(name, pretrained)
    return factory_of(name)(name, num_classes=num_classes, pretrained=pretrained, **kwargs)


def describe(default: Optional[str] = None) -> str:
    """The architectures for ``--arch`` help, one clause per family (the default's first): names,
    summary, pretrained weights."""
    groups: Dict[Tuple[str, str, Tuple[Weights, ...]], List[str]] = {}
    found = arch_specs()
    first = found[default].family if default in found else ""
    for spec in sorted(found.values(), key=lambda s: s.family != first):
        label = spec.name + (" (default)" if spec.name == default else "")
        groups.setdefault((spec.family, spec.summary, spec.weights), []).append(label)
    parts = []
    for (_, summary, weights), names in groups.items():
        w = " [" + ", ".join(f"{x.name}: {x.source}" for x in weights) + "]" if weights else ""
        parts.append(f"{', '.join(names)}: {summary}{w}")
    return "; ".join(parts)


def add_arch_option(parser: Any, default: Optional[str] = None, what: str = "architecture") -> None:
    """``--arch`` with its choices and help generated from the registry (torch-free), for every command
    that takes one."""
    parser.add_argument("--arch", default=default, choices=list_models(), metavar="ARCH",
                        help=f"{what}: {describe(default)}")
