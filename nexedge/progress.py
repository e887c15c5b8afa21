"""Progress output that suits where it goes.

On a terminal (stderr is a TTY) a tqdm bar. Anywhere else (a log file, journald, CI) a heartbeat
line at least every 30 s while a loop runs (``epoch 3 train: 12/34 batches, 384 images, 41.2
images/s, ETA 53 s``; ``NEXEDGE_HEARTBEAT_S`` changes the interval) and one line per stage when it
ends, so a log shows that a long pass is alive without thousands of carriage-return updates.
"""

import argparse
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Optional

#: Seconds between heartbeat lines when stderr is not a terminal (``NEXEDGE_HEARTBEAT_S`` overrides).
HEARTBEAT_S = 30.0


def add_progress_option(p: argparse.ArgumentParser) -> None:
    """``--no-progress``, the same for every command that shows progress (``args.no_progress``)."""
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (without a terminal on stderr there are none anyway: heartbeat lines)")


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def heartbeat_interval() -> float:
    """:data:`HEARTBEAT_S`, or ``NEXEDGE_HEARTBEAT_S`` (seconds, > 0) when set."""
    text = os.environ.get("NEXEDGE_HEARTBEAT_S", "").strip()
    if not text:
        return HEARTBEAT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"NEXEDGE_HEARTBEAT_S={text!r}: expected seconds between progress lines, > 0")
    return value


def format_seconds(s: float) -> str:
    """``4.2 s``, ``42 s``, ``3 min 20 s``, ``1 h 05 min``."""
    s = max(0.0, float(s))
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


class LineProgress:
    """tqdm's small API (iterate, ``update``, ``set_postfix``, ``close``) for output that is not a terminal.

    Prints a heartbeat (done/total, rate, ETA) whenever ``heartbeat`` seconds have passed since the
    last line, and with ``stage_line`` one summary line at close. ``images(item)``: how many images
    an iterated item holds, for an images/s rate when the unit is something else (batches).
    """

    def __init__(self, iterable: Optional[Iterable[Any]] = None, desc: str = "", total: Optional[int] = None,
                 unit: str = "it", images: Optional[Callable[[Any], int]] = None, heartbeat: Optional[float] = None,
                 stage_line: bool = True, clock: Callable[[], float] = time.monotonic, **_: Any) -> None:
        self.iterable, self.desc, self.unit = iterable, desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.images_of = images
        self.images = 0
        self.n = 0
        self.postfix = ""
        self.clock = clock
        self.heartbeat = heartbeat_interval() if heartbeat is None else heartbeat
        self.stage_line = stage_line
        self.t0 = self.last = clock()
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        for x in self.iterable or ():
            yield x
            self.n += 1
            if self.images_of is not None:
                self.images += int(self.images_of(x))
            self._beat()
        self.close()

    def __len__(self) -> int:
        return len(self.iterable) if self.iterable is not None else int(self.total or 0)  # type: ignore[arg-type]

    def update(self, n: int = 1) -> None:
        self.n += n
        self._beat()

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def status(self, now: Optional[float] = None) -> str:
        """``desc: done/total unit, images, rate, ETA`` as of ``now`` (default: the clock's now)."""
        dt = max((self.clock() if now is None else now) - self.t0, 1e-9)
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"]
        if self.images_of is not None:
            parts += [f"{self.images} images", f"{self.images / dt:.1f} images/s"]
        else:
            parts.append(f"{self.n / dt:.1f} {self.unit}/s")
        if self.total and self.n:
            parts.append("ETA " + format_seconds((self.total - self.n) * dt / self.n))
        tail = f" ({self.postfix})" if self.postfix else ""
        return f"{self.desc}: " + ", ".join(parts) + tail

    def _beat(self) -> None:
        if self.heartbeat <= 0:
            return
        now = self.clock()
        if now - self.last >= self.heartbeat:
            self.last = now
            print(self.status(now), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.stage_line:
            tail = f" ({self.postfix})" if self.postfix else ""
            print(f"{self.desc}: {self.n} {self.unit} in {self.clock() - self.t0:.1f} s{tail}", file=sys.stderr,
                  flush=True)


def progress(iterable: Optional[Iterable[Any]] = None, desc: str = "", total: Optional[int] = None,
             enabled: bool = True, unit: str = "it", leave: bool = False, per_stage_line: bool = True,
             images: Optional[Callable[[Any], int]] = None) -> Any:
    """A progress bar on a terminal; otherwise heartbeat lines and one summary line per stage
    (``per_stage_line=False``: heartbeats only, for loops whose caller prints its own line);
    nothing when disabled. ``images``: see :class:`LineProgress`."""
    if not enabled:
        return LineProgress(iterable, desc, total, unit, heartbeat=0, stage_line=False)
    if stderr_is_tty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, dynamic_ncols=True)
    return LineProgress(iterable, desc, total, unit, images=images, stage_line=per_stage_line)
