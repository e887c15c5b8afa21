"""The load probe: open, check and warm a model in a child process, under a memory budget,
before the daemon opens it itself.

A model can allocate far more than its file size while it is opened or run (a 1 KB ONNX
graph can build a 1.5 GB constant). The daemon therefore never opens an unknown model
first: ``python -m nexedge.serve.loadprobe`` does, exactly as the daemon would
(:func:`nexedge.serve.slots.open_slot`: card, measured-operating-point rule, warm-up at
``batching.max_batch``, cascade plan) plus the compatibility check against the line's card.
The parent polls the child's resident set every few milliseconds and kills it when it
grows past the budget (what ``lifecycle.memory_limit`` leaves after the resident models);
on a CPU-only ONNX Runtime the child also caps its own address space (budget + slack) so
one huge allocation fails at once (not with CUDA or TensorRT, which reserve address space
far beyond what they use; there the resident set, host memory only, is the guard). Only a
model that passed, with its measured peak, is opened by the daemon.

Linux (``/proc``). Python 3.8, no torch.
"""

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from typing import Any, Dict, Optional

log = logging.getLogger("nexedge.serve")

#: Seconds a probe may take (opening and warming a large TensorRT engine takes a while).
TIMEOUT_S = 600.0
#: How often the parent reads the child's resident set.
POLL_S = 0.002
#: Address-space headroom of the child above its budget (thread stacks and allocator arenas are
#: reserved address space, not memory); the resident-set poll is the budget's real guard.
AS_SLACK = 1 << 30


def _status_bytes(pid: Any, key: str) -> int:
    """``VmRSS``/``VmHWM``/``VmSize`` of a process from /proc (0 when unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def probe(path: str, cfg: Any, line_card: Any, budget: Optional[int], timeout_s: float = TIMEOUT_S) -> Dict[str, Any]:
    """Check ``path`` in a child process; ``{"peak_bytes", "sha256", "model_id"}`` when it passed,
    :class:`~nexedge.serve.slots.LifecycleError` saying why not. ``budget``: the bytes it may
    grow by (None: no memory limit, the checks only)."""
    import dataclasses

    from nexedge.serve.slots import LifecycleError

    sections = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}  # absent optional sections
    req = {"path": path, "config": sections, "line_card": line_card.data,
           "line_source": line_card.source, "budget": budget}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), MALLOC_ARENA_MAX="2")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "nexedge.serve.loadprobe"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    peak_seen, base, result, buf = 0, None, None, b""
    try:
        try:
            proc.stdin.write(json.dumps(req).encode("utf-8"))
            proc.stdin.close()
        except BrokenPipeError:  # it died at start: reported below as an end without an answer
            pass
        fd = proc.stdout.fileno()
        while result is None:
            if time.monotonic() - t0 > timeout_s:
                raise LifecycleError(f"load {path}: checking it took longer than {timeout_s:g} s; refused")
            ready, _, _ = select.select([fd], [], [], POLL_S)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    word, _, rest = line.decode("utf-8", "replace").partition(" ")
                    if word == "BASE":
                        base = int(rest)
                    elif word == "RESULT":
                        result = json.loads(rest)
            if base is not None and budget is not None and result is None:
                rss = _status_bytes(proc.pid, "VmRSS")
                peak_seen = max(peak_seen, rss - base)
                if rss - base > budget:
                    proc.kill()
                    raise LifecycleError(
                        f"load {path}: it grew past {_mib(budget)} while it was opened and warmed up in a child "
                        f"process (lifecycle.memory_limit {cfg.lifecycle.memory_limit} less the resident "
                        "models); refused, the line's models were not touched")
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # answered but hangs on its way out: the answer stands
            rc = None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    if result is None:
        how = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit status {rc}"
        raise LifecycleError(f"load {path}: the process checking it ended without an answer ({how}); refused")
    if not result.get("ok"):
        raise LifecycleError(str(result.get("error")))
    result["peak_bytes"] = max(int(result["peak_bytes"]), peak_seen)
    log.info("load probe of %s: passed in %.1f s, peak %s", path, time.monotonic() - t0,
             _mib(result["peak_bytes"]))
    return result


def preload(path: str, model: Dict[str, Any]) -> bool:
    """Import the libraries of the backend that runs ``path`` (its spec's ``preload``: the daemon has
    them loaded, so they are not this model's cost) and say whether the model runs on the CPU only
    (its spec's ``cpu_only``; CUDA reserves address space far beyond what it uses: no cap then).
    ``model`` is the config's raw ``model`` section."""
    import importlib

    from nexedge.runtime import registry

    try:
        spec = registry.choose(path, model.get("backend") or registry.AUTO)
    except ValueError:  # the open in the probe names the problem
        return False
    for mod in spec.preload:
        try:
            importlib.import_module(mod)
        except ImportError:  # the open names the missing library
            return False
    if not spec.cpu_only:
        return False
    try:
        opts = registry.options_for(path, model.get("options"), backend=spec.name)
        return bool(getattr(importlib.import_module(spec.module), spec.cpu_only)(opts))
    except ValueError:  # a provider that is not there: the open names it
        return False


def _child() -> int:
    """The probe process: read the request from stdin, answer ``BASE``, then ``RESULT`` lines."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C for the daemon is the daemon's to handle
    req = json.loads(sys.stdin.read())
    path, budget = req["path"], req["budget"]
    from nexedge.card import ModelCard
    from nexedge.serve import config as serve_config
    from nexedge.serve import slots

    cpu_only = preload(path, req["config"].get("model") or {})
    try:  # the peak from here on is this model's (Linux: 5 resets VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = _status_bytes("self", "VmRSS")
    if budget is not None and cpu_only:
        import resource

        cap = _status_bytes("self", "VmSize") + int(budget) + AS_SLACK
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or cap < hard:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    print("BASE", base, flush=True)
    out: Dict[str, Any]
    try:
        cfg = serve_config.from_dict(req["config"])
        line = ModelCard(req["line_card"], source=req["line_source"])
        slot = slots.open_slot(cfg, path, "load probe")
        slots.check_compatible(line, slot.card, slot.backend, cfg)
        out = {"ok": True, "sha256": slot.sha256, "model_id": slot.model_id,
               "peak_bytes": max(_status_bytes("self", "VmHWM") - base, 0)}
    except MemoryError:
        out = {"ok": False, "error": f"load {path}: it ran out of memory while it was opened and warmed up in a "
                                     f"child process capped near {_mib(budget or 0)} (lifecycle.memory_limit); "
                                     "refused, the line's models were not touched"}
    except Exception as e:  # reported to the daemon, which refuses the load with it
        msg = str(e)
        if "alloc" in msg.lower() and budget is not None:
            msg = (f"it failed to allocate memory while it was opened and warmed up in a child process capped near "
                   f"{_mib(budget)} (lifecycle.memory_limit): {msg}")
        out = {"ok": False, "error": msg if msg.startswith(path) or msg.startswith("load ") else f"load {path}: {msg}"}
    print("RESULT", json.dumps(out, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
