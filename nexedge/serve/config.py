"""Daemon configuration: YAML file + CLI overrides, validated with errors that
name the key, the value and what was expected (see docs/configuration.md).

Optional features (``store``, ``monitor``, ``pull``, ``auth``) are on when their
section is present. Python 3.8, no torch.
"""

import dataclasses
import logging
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import yaml

from nexedge.metrics import DEFAULT_TPR_FLOOR

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and the expected value."""


@dataclasses.dataclass
class ModelCfg:
    path: str = ""
    #: The backend that runs ``path`` and every model ``nexedge line load``s: auto = by suffix, or a
    #: backend's name (nexedge.runtime.registry), which must open the file.
    backend: str = "auto"
    verify_card: bool = True
    warmup: int = 3
    #: Backend options (nexedge.runtime.registry): per backend ({onnxruntime: {...}, tensorrt: {...}})
    #: or flat, then for the backend of ``path`` only.
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Cascade TenCrop (nexedge.runtime.cascade): auto = when the card has a band measured for the
    #: threshold in use; on = required (startup fails naming why not); off = full crops on every frame.
    cascade: str = "auto"
    #: Stage-1 (center-crop) artifact of an in-graph model, when not the one its card names (engines).
    stage1: Optional[str] = None


@dataclasses.dataclass
class SocketsCfg:
    frames: str = "tcp://127.0.0.1:5555"
    verdicts: str = "tcp://127.0.0.1:5556"
    max_message_bytes: int = 32 << 20
    max_header_bytes: int = 16 << 10
    #: What a frame may decode to (``sockets.decode_limits.<key>``).
    decode_limits: "DecodeLimitsCfg" = dataclasses.field(default_factory=lambda: DecodeLimitsCfg())
    decode_workers: int = 2
    #: Decode threads one camera may use at once; 0 = all but one (at least 1).
    decode_per_camera: int = 0
    #: Significant bits of 16-bit samples when the frame does not say (native ``bit_depth``); none = the
    #: card's input.bit_depth, else 16.
    uint16_bit_depth: Optional[int] = None
    max_cameras: int = 256
    hwm: int = 10000
    linger_ms: int = 2000
    #: Memory guard (nexedge.serve.guard; ``sockets.guard.<key>``).
    guard: "GuardCfg" = dataclasses.field(default_factory=lambda: GuardCfg())
    #: Connections per socket (frames; control and pull take 16); further ones are closed at once.
    max_peers: int = 256
    #: ZMTP heartbeat interval (a peer silent for 3 intervals is dropped); 0 = off (TCP keepalive only).
    heartbeat_s: float = 10.0



@dataclasses.dataclass
class DecodeLimitsCfg:
    """``sockets.decode_limits``: frames past these get RECHECK before or instead of decoding."""

    max_pixels: int = 50_000_000
    max_decoded_bytes: int = 128 << 20
    #: JPEGs with more scans are refused (too_many_scans) before decoding; encoders write at most 10.
    max_jpeg_scans: int = 32


@dataclasses.dataclass
class GuardCfg:
    """``sockets.guard``: the memory guard (nexedge.serve.guard, docs/protocol.md#memory)."""

    #: Bytes one peer may have sent that the daemon has not read as whole messages; none = 2 x
    #: sockets.max_message_bytes + 1 MiB.
    max_peer_pending_bytes: Optional[int] = None
    #: The same over all peers of all sockets (frames, verdicts, control, pull).
    max_pending_bytes: int = 256 << 20
    #: A peer holding an unfinished message this long without completing one is disconnected.
    unfinished_timeout_s: float = 10.0
    #: Process RSS past which the peer holding the most unfinished data is disconnected: a size, 'auto'
    #: (RSS when ready + 512 MiB) or 'off'.
    rss_limit: str = "auto"


@dataclasses.dataclass
class BatchingCfg:
    max_batch: int = 8
    max_delay_ms: float = 5.0
    max_queue: int = 64
    deadline_ms: float = 2000.0


@dataclasses.dataclass
class DecisionCfg:
    target_tpr: Optional[float] = None
    threshold: Optional[float] = None
    #: Start even when the card's operating points were measured with another crop mode than the model runs.
    allow_unmeasured: bool = False
    #: WARNING at start when the operating point's 95 % TPR lower bound is below this.
    tpr_floor: float = DEFAULT_TPR_FLOOR


@dataclasses.dataclass
class UncertainCfg:
    band: float = 1.0
    audit_fraction: float = 0.001
    seed: Optional[int] = None


@dataclasses.dataclass
class StoreCfg:
    path: str = ""
    quota: Optional[str] = None
    queue: int = 512
    queue_bytes: str = "64MiB"
    recheck_per_minute: float = 6.0
    #: Free space the store leaves on its file system (it evicts, then drops, to keep it).
    reserve: str = "256MiB"


@dataclasses.dataclass
class MetricsCfg:
    host: str = "127.0.0.1"
    port: int = 9108
    #: Connection limits (``metrics.limits.<key>``).
    limits: "MetricsLimitsCfg" = dataclasses.field(default_factory=lambda: MetricsLimitsCfg())



@dataclasses.dataclass
class MetricsLimitsCfg:
    """``metrics.limits``: what the /metrics endpoint serves at once."""

    max_connections: int = 16
    #: Connections from one address; past it (or max_connections) the oldest one not done sending its
    #: request is closed to make room.
    max_per_client: int = 4
    #: Deadline for a whole exchange (request and reply), from accept.
    timeout_s: float = 5.0


@dataclasses.dataclass
class MonitorCfg:
    window: int = 500
    min_frames: int = 100
    limits: Dict[str, Any] = dataclasses.field(default_factory=dict)
    alarm_audit_rate: float = 0.05
    #: The line's defect rate for the PSI reference: a number in [0, 1], or 'estimate' (fitted per camera to
    #: its last prior_window frames).
    defect_prior: str = "estimate"
    prior_window: int = 5000


@dataclasses.dataclass
class PullCfg:
    bind: str = "tcp://127.0.0.1:5557"
    #: Seconds a page's samples stay leased to the client that paged them (others skip them; only it may ack).
    lease_s: float = 600.0


@dataclasses.dataclass
class AuthCfg:
    server_secret_file: str = ""
    allowed_clients_dir: str = ""


@dataclasses.dataclass
class LifecycleCfg:
    """Model slots, hot swap, shadow mode, promotion/rollback (docs/lifecycle.md)."""

    #: REQ/REP control endpoint; None = off. Non-loopback needs the auth section.
    control: Optional[str] = None
    #: Versions folder with the atomically written ``active`` pointer; None = no persistence.
    models_dir: Optional[str] = None
    #: Keep the replaced model loaded after ``promote`` for an instant ``rollback``.
    keep_previous: bool = True
    #: Models resident at once (active + candidate + previous).
    max_models: int = 3
    #: Refuse a load when the resident models would exceed this (e.g. '2GiB'); None = no limit.
    memory_limit: Optional[str] = None
    #: Share of frames the candidate scores in shadow (0..1).
    shadow_fraction: float = 1.0
    #: Batches waiting for the shadow scorer; beyond, frames are skipped and counted.
    shadow_queue: int = 2
    #: Rule-based promotion (``lifecycle.auto_promote.<key>``).
    auto_promote: "AutoPromoteCfg" = dataclasses.field(default_factory=lambda: AutoPromoteCfg())
    #: Automatic rollback (``lifecycle.auto_rollback.<key>``).
    auto_rollback: "AutoRollbackCfg" = dataclasses.field(default_factory=lambda: AutoRollbackCfg())



@dataclasses.dataclass
class AutoPromoteCfg:
    """``lifecycle.auto_promote``: promote the candidate by rule."""

    #: After this many shadow frames (0 = off) ...
    frames: int = 0
    #: ... when the disagreement rate (both directions) is at most this ...
    max_disagreement: float = 0.01
    #: ... and the 95 % upper bound on the share of the active model's REJECTs the candidate PASSes is at most this.
    max_escape: float = 0.05


@dataclasses.dataclass
class AutoRollbackCfg:
    """``lifecycle.auto_rollback``: roll a promoted model back when its reject count leaves the limits."""

    #: Limits from the previous model's last K decisions (0 = off) ...
    baseline: int = 0
    #: ... the promoted model's cumulative reject count checked every this many frames ...
    subgroup: int = 200
    #: ... for this many frames after the change ...
    watch: int = 2000
    #: ... with this chance of rolling back a model as good as the previous one (per change, all checks).
    alpha: float = 0.01


@dataclasses.dataclass
class LoggingCfg:
    level: str = "INFO"
    format: str = "json"


@dataclasses.dataclass
class ShutdownCfg:
    timeout_s: float = 10.0


@dataclasses.dataclass
class Config:
    model: ModelCfg
    sockets: SocketsCfg
    batching: BatchingCfg
    decision: DecisionCfg
    uncertain: UncertainCfg
    metrics: Optional[MetricsCfg]
    logging: LoggingCfg
    shutdown: ShutdownCfg
    store: Optional[StoreCfg] = None
    monitor: Optional[MonitorCfg] = None
    pull: Optional[PullCfg] = None
    auth: Optional[AuthCfg] = None
    lifecycle: Optional[LifecycleCfg] = None


SECTIONS = {
    "model": ModelCfg, "sockets": SocketsCfg, "batching": BatchingCfg, "decision": DecisionCfg,
    "uncertain": UncertainCfg, "metrics": MetricsCfg, "logging": LoggingCfg, "shutdown": ShutdownCfg,
    "store": StoreCfg, "monitor": MonitorCfg, "pull": PullCfg, "auth": AuthCfg,
    "lifecycle": LifecycleCfg,
}
#: Retired keys -> the key that replaced them (the value carries over). An old config that sets one still
#: loads, with a warning naming the new key.
REMOVED_KEYS: Dict[str, str] = {
    "sockets.max_pixels": "sockets.decode_limits.max_pixels",
    "sockets.max_decoded_bytes": "sockets.decode_limits.max_decoded_bytes",
    "sockets.max_jpeg_scans": "sockets.decode_limits.max_jpeg_scans",
    "sockets.max_peer_pending_bytes": "sockets.guard.max_peer_pending_bytes",
    "sockets.max_pending_bytes": "sockets.guard.max_pending_bytes",
    "sockets.unfinished_timeout_s": "sockets.guard.unfinished_timeout_s",
    "sockets.rss_limit": "sockets.guard.rss_limit",
    "metrics.max_connections": "metrics.limits.max_connections",
    "metrics.max_per_client": "metrics.limits.max_per_client",
    "metrics.timeout_s": "metrics.limits.timeout_s",
    "lifecycle.auto_promote_frames": "lifecycle.auto_promote.frames",
    "lifecycle.auto_promote_max_disagreement": "lifecycle.auto_promote.max_disagreement",
    "lifecycle.auto_promote_max_escape": "lifecycle.auto_promote.max_escape",
    "lifecycle.auto_rollback_baseline": "lifecycle.auto_rollback.baseline",
    "lifecycle.auto_rollback_subgroup": "lifecycle.auto_rollback.subgroup",
    "lifecycle.auto_rollback_watch": "lifecycle.auto_rollback.watch",
    "lifecycle.auto_rollback_alpha": "lifecycle.auto_rollback.alpha",
}
#: Sections that switch a feature on by being present.
OPTIONAL = ("store", "monitor", "pull", "auth", "lifecycle")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)


def monitor_prior(m: "MonitorCfg") -> Any:
    """``monitor.defect_prior`` as the shift monitor takes it: a float in [0, 1] or 'estimate'."""
    v = str(m.defect_prior).strip().lower()
    if v == "estimate":
        return "estimate"
    try:
        p = float(v)
    except ValueError:
        p = -1.0
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"monitor.defect_prior: {m.defect_prior!r}; expected the line's defect rate in [0, 1] "
                          "(e.g. 0.01) or 'estimate' (fitted to each camera's recent frames)")
    return p


def rss_limit(s: "SocketsCfg", ready_rss: int = 0) -> Optional[int]:
    """``sockets.guard.rss_limit`` in bytes (None when off); 'auto' is ``ready_rss`` + 512 MiB."""
    value = s.guard.rss_limit
    v = str(value).strip().lower()
    if v == "off":
        return None
    if v == "auto":
        return ready_rss + (512 << 20)
    try:
        return parse_size(value, "sockets.guard.rss_limit")
    except ConfigError:
        raise ConfigError(f"sockets.guard.rss_limit: {value!r}; expected a size such as '2GiB', 'auto' (RSS when "
                          "ready + 512 MiB) or 'off'") from None


def parse_size(value: Any, key: str, allow_zero: bool = False) -> int:
    """``"2GB"``, ``"500 MiB"``, ``1048576`` -> bytes (K/M/G/T are powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and (value > 0 or (allow_zero and value == 0)):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ConfigError(f"{key}: {value!r} is not a size; expected bytes or e.g. '500MB', '2GiB'")
    unit = (m.group(2) or "").upper().replace("I", "").replace("B", "")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    n = int(float(m.group(1)) * mult)
    if n < 0 or (n == 0 and not allow_zero):
        raise ConfigError(f"{key}: {value!r} must be a positive size")
    return n


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = getattr(tp, "__origin__", None)
    if origin is not None and type(None) in getattr(tp, "__args__", ()):  # Optional[X]
        if value is None:
            return None
        inner = [a for a in tp.__args__ if a is not type(None)][0]
        return _coerce(value, inner, key)
    if origin in (dict, Dict):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def _retire(name: str, raw: Dict[str, Any]) -> Dict[str, Any]:
    """``raw`` (section ``name``) with each retired key moved to the one that replaced it, warning once each."""
    out = dict(raw)
    for key in list(raw):
        new = REMOVED_KEYS.get(f"{name}.{key}")
        if new is None:
            continue
        value = out.pop(key)
        group, sub = new.split(".")[1:]
        nested = out.get(group)
        nested = dict(nested) if isinstance(nested, dict) else {}
        if sub in nested and nested[sub] != value:
            raise ConfigError(f"{name}.{key} (retired) is {value!r} but {new} is {nested[sub]!r}; keep only {new}")
        nested[sub] = value
        out[group] = nested
        log.warning("config: %s.%s is retired; use %s (value %r carried over)", name, key, new, value)
    return out


def _build(cls: Any, raw: Any, name: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{name}.{key}: unknown key; expected one of {sorted(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{name}.{key}")
        else:
            kwargs[key] = _coerce(value, tp, f"{name}.{key}")
    return cls(**kwargs)


def _section(name: str, raw: Any) -> Any:
    if isinstance(raw, dict):
        raw = _retire(name, raw)
    return _build(SECTIONS[name], raw, name)


def _hints(cls: Any) -> Dict[str, Any]:
    import typing

    return typing.get_type_hints(cls, globals())


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: {value!r} must be {'>= 0' if allow_zero else '> 0'}")


def validate(cfg: Config) -> Config:
    """Range checks across keys; raise :class:`ConfigError` naming the key."""
    if not cfg.model.path:
        from nexedge.runtime.registry import suffix_text

        raise ConfigError("model.path: missing; expected the path of a model artifact "
                          f"({suffix_text(line=True)}) with its card")
    _positive("model.warmup", cfg.model.warmup, allow_zero=True)
    from nexedge.runtime import registry

    try:
        if cfg.model.backend != registry.AUTO:  # auto: the suffix is checked when the model opens
            registry.choose(cfg.model.path, cfg.model.backend, "model.backend")
        registry.check_config_options(cfg.model.options, cfg.model.path, backend=cfg.model.backend)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.model.cascade not in ("auto", "on", "off"):
        raise ConfigError(f"model.cascade: {cfg.model.cascade!r}; expected auto, on or off")
    s = cfg.sockets
    for key in ("frames", "verdicts"):
        addr = getattr(s, key)
        if not re.match(r"^(tcp|ipc|inproc)://.+", addr):
            raise ConfigError(f"sockets.{key}: {addr!r} is not a ZeroMQ endpoint; expected e.g. tcp://127.0.0.1:5555")
    for key in ("max_message_bytes", "max_header_bytes", "max_cameras", "hwm", "max_peers"):
        _positive("sockets." + key, getattr(s, key))
    for key in ("max_pixels", "max_decoded_bytes", "max_jpeg_scans"):
        _positive("sockets.decode_limits." + key, getattr(s.decode_limits, key))
    for key in ("max_pending_bytes", "unfinished_timeout_s"):
        _positive("sockets.guard." + key, getattr(s.guard, key))
    for key in ("decode_workers", "decode_per_camera", "linger_ms", "heartbeat_s"):
        _positive("sockets." + key, getattr(s, key), allow_zero=True)
    if s.uint16_bit_depth is not None and not 1 <= s.uint16_bit_depth <= 16:
        raise ConfigError(f"sockets.uint16_bit_depth: {s.uint16_bit_depth} must be 1..16 (e.g. 12 for a 12-bit "
                          "sensor sending 16-bit words)")
    if s.guard.max_peer_pending_bytes is not None:
        _positive("sockets.guard.max_peer_pending_bytes", s.guard.max_peer_pending_bytes)
    rss_limit(s)
    b = cfg.batching
    for key in ("max_batch", "max_queue", "deadline_ms"):
        _positive("batching." + key, getattr(b, key))
    _positive("batching.max_delay_ms", b.max_delay_ms, allow_zero=True)
    if b.max_queue < b.max_batch:
        raise ConfigError(f"batching.max_queue: {b.max_queue} is smaller than batching.max_batch {b.max_batch}")
    d = cfg.decision
    if d.threshold is not None and d.target_tpr is not None:
        raise ConfigError("decision: set either threshold or target_tpr, not both "
                          f"(got threshold={d.threshold}, target_tpr={d.target_tpr})")
    if d.threshold is not None and not 0.0 < d.threshold <= 1.0:
        raise ConfigError(f"decision.threshold: {d.threshold} must be in (0, 1]")
    if not 0.0 < d.tpr_floor < 1.0:
        raise ConfigError(f"decision.tpr_floor: {d.tpr_floor} must be in (0, 1)")
    if d.target_tpr is not None and not 0.0 < d.target_tpr <= 100.0:
        raise ConfigError(f"decision.target_tpr: {d.target_tpr} must be a fraction (0, 1] or a percent (1, 100]")
    u = cfg.uncertain
    _positive("uncertain.band", u.band, allow_zero=True)
    if not 0.0 <= u.audit_fraction <= 1.0:
        raise ConfigError(f"uncertain.audit_fraction: {u.audit_fraction} must be in [0, 1]")
    if cfg.store is not None:
        if not cfg.store.path:
            raise ConfigError("store.path: missing; expected a folder for the uncertain-sample store")
        if cfg.store.quota is not None:
            parse_size(cfg.store.quota, "store.quota")
        _positive("store.queue", cfg.store.queue)
        parse_size(cfg.store.queue_bytes, "store.queue_bytes")
        _positive("store.recheck_per_minute", cfg.store.recheck_per_minute, allow_zero=True)
        parse_size(cfg.store.reserve, "store.reserve", allow_zero=True)
        if cfg.store.quota is not None and parse_size(cfg.store.quota, "store.quota") < (4 << 20):
            raise ConfigError(f"store.quota: {cfg.store.quota!r} is below 4MiB, too small for the database, its WAL "
                              "and a few samples")
    if cfg.metrics is not None:
        if not 0 <= cfg.metrics.port <= 65535:
            raise ConfigError(f"metrics.port: {cfg.metrics.port} must be 0..65535 (0 = any free port)")
        for key in ("max_connections", "max_per_client", "timeout_s"):
            _positive("metrics.limits." + key, getattr(cfg.metrics.limits, key))
    if cfg.pull is not None:
        _positive("pull.lease_s", cfg.pull.lease_s)
    if cfg.monitor is not None:
        monitor_prior(cfg.monitor)
        if cfg.monitor.prior_window < cfg.monitor.window:
            raise ConfigError(f"monitor.prior_window: {cfg.monitor.prior_window} must be >= monitor.window "
                              f"{cfg.monitor.window}")
    if cfg.logging.level.upper() not in LOG_LEVELS:
        raise ConfigError(f"logging.level: {cfg.logging.level!r}; expected one of {list(LOG_LEVELS)}")
    if cfg.logging.format not in ("json", "text"):
        raise ConfigError(f"logging.format: {cfg.logging.format!r}; expected 'json' or 'text'")
    if cfg.auth is not None and not (cfg.auth.server_secret_file and cfg.auth.allowed_clients_dir):
        raise ConfigError("auth: needs server_secret_file and allowed_clients_dir (make them with `nexedge keys`)")
    _positive("shutdown.timeout_s", cfg.shutdown.timeout_s)
    if cfg.lifecycle is not None:
        _validate_lifecycle(cfg.lifecycle, cfg.auth is not None)
    return cfg


def backend_line(cfg: Config) -> str:
    """``model.path runs on the onnxruntime backend (auto: by suffix) with options {...}``, with what it
    still needs where its library is missing; "" when no backend runs ``model.path``."""
    from nexedge.runtime import registry

    try:
        spec = registry.choose(cfg.model.path, cfg.model.backend, "model.backend")
        opts = registry.options_for(cfg.model.path, cfg.model.options, backend=spec.name)
    except ValueError:
        return ""
    how = "auto: by suffix" if cfg.model.backend == registry.AUTO else "model.backend"
    need = registry.missing(spec.name)
    return (f"model.path runs on the {spec.name} backend ({how}) with options {opts or '{}'}"
            + (f"; {need}" if need else ""))


def _validate_lifecycle(lc: LifecycleCfg, has_auth: bool) -> None:
    if lc.control is not None:
        if not re.match(r"^(tcp|ipc|inproc)://.+", lc.control):
            raise ConfigError(f"lifecycle.control: {lc.control!r} is not a ZeroMQ endpoint; expected e.g. "
                              "tcp://127.0.0.1:5558")
        from nexedge.serve.pullserver import is_loopback

        if not has_auth and not is_loopback(lc.control):
            raise ConfigError(f"lifecycle.control: {lc.control!r} is not loopback: changing the line's model needs "
                              "the auth section (CurveZMQ allow-list) or a loopback address such as "
                              "tcp://127.0.0.1:5558")
    if not 2 <= lc.max_models <= 3:
        raise ConfigError(f"lifecycle.max_models: {lc.max_models} must be 2 or 3 (active + candidate or previous; a "
                          "swap without stopping the line needs the new model loaded beside the old one)")
    if lc.memory_limit is not None:
        parse_size(lc.memory_limit, "lifecycle.memory_limit")
    if not 0.0 <= lc.shadow_fraction <= 1.0:
        raise ConfigError(f"lifecycle.shadow_fraction: {lc.shadow_fraction} must be in [0, 1]")
    _positive("lifecycle.shadow_queue", lc.shadow_queue)
    ap, ar = lc.auto_promote, lc.auto_rollback
    _positive("lifecycle.auto_promote.frames", ap.frames, allow_zero=True)
    if not 0.0 <= ap.max_disagreement <= 1.0:
        raise ConfigError(f"lifecycle.auto_promote.max_disagreement: {ap.max_disagreement} must be in [0, 1]")
    if not 0.0 < ap.max_escape < 1.0:
        raise ConfigError(f"lifecycle.auto_promote.max_escape: {ap.max_escape} must be in (0, 1) (a "
                          "candidate that PASSes every frame the active model REJECTs must never qualify)")
    _positive("lifecycle.auto_rollback.baseline", ar.baseline, allow_zero=True)
    _positive("lifecycle.auto_rollback.subgroup", ar.subgroup)
    _positive("lifecycle.auto_rollback.watch", ar.watch)
    if ar.watch < ar.subgroup:
        raise ConfigError(f"lifecycle.auto_rollback.watch: {ar.watch} is shorter than one check "
                          f"(auto_rollback.subgroup {ar.subgroup})")
    if ar.watch // ar.subgroup > 10000:
        raise ConfigError(f"lifecycle.auto_rollback.watch / auto_rollback.subgroup: "
                          f"{ar.watch // ar.subgroup} checks; at most 10000 (check less often)")
    if not 0.0 < ar.alpha < 1.0:
        raise ConfigError(f"lifecycle.auto_rollback.alpha: {ar.alpha} must be in (0, 1)")


def from_dict(raw: Optional[Dict[str, Any]], source: str = "<config>") -> Config:
    """Build and validate a :class:`Config` from a parsed YAML mapping."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; expected some of {sorted(SECTIONS)}")
    parts = {}
    for name in SECTIONS:
        if name in OPTIONAL and name not in raw:
            parts[name] = None
        elif name == "metrics" and name in raw and raw[name] is False:
            parts[name] = None  # `metrics: false` turns the HTTP endpoint off
        else:
            parts[name] = _section(name, raw.get(name))
    cfg = Config(**parts)
    if source not in ("<config>", "<overrides>"):
        resolve_paths(cfg, os.path.dirname(os.path.abspath(source)))
    return validate(cfg)


#: (section, key) of every file or folder a config names; relative ones are relative to the config file.
PATH_KEYS = (("model", "path"), ("model", "stage1"), ("store", "path"), ("auth", "server_secret_file"),
             ("auth", "allowed_clients_dir"), ("lifecycle", "models_dir"))


def resolve_paths(cfg: Config, base: str) -> None:
    """Make every relative path in ``cfg`` relative to ``base`` (the config file's folder), never to the
    working directory, which under systemd is ``/`` unless the unit sets one."""
    for section, key in PATH_KEYS:
        part = getattr(cfg, section)
        value = getattr(part, key, "") if part is not None else ""
        if value and not os.path.isabs(value):
            setattr(part, key, os.path.normpath(os.path.join(base, value)))


def apply_overrides(raw: Dict[str, Any], overrides: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """Set ``section.key`` values (already parsed) into a raw config mapping."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (raw or {}).items()}
    for dotted, value in overrides:
        section, sep, key = dotted.partition(".")
        if not sep or not key:
            raise ConfigError(f"override {dotted!r}: expected section.key=value, e.g. batching.max_batch=16")
        if section not in SECTIONS:
            raise ConfigError(f"override {dotted!r}: unknown section {section!r}; expected one of {sorted(SECTIONS)}")
        sec = out.get(section)
        sec = dict(sec) if isinstance(sec, dict) else {}
        key, dot, sub = key.partition(".")  # a group's key: section.group.key
        if dot:
            group = sec.get(key)
            group = dict(group) if isinstance(group, dict) else {}
            group[sub] = value
            sec[key] = group
        else:
            sec[key] = value
        out[section] = sec
    return out


def parse_set(item: str) -> Tuple[str, Any]:
    """``"batching.max_batch=16"`` -> ("batching.max_batch", 16) (value parsed as YAML)."""
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from None


def load(path: Optional[str], overrides: Optional[List[Tuple[str, Any]]] = None) -> Config:
    """Read a YAML config (or none), apply overrides, validate."""
    raw: Dict[str, Any] = {}
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"config file {path} not found")
        with open(path, encoding="utf-8") as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if overrides:
        raw = apply_overrides(raw, overrides)
    return from_dict(raw, source=path or "<overrides>")
