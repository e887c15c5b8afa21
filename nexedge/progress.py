"""Progress output that suits where it goes.

On a terminal (stderr is a TTY) a tqdm bar; anywhere else (a log file, journald, CI)
one line per stage when it ends, so a log holds ``epoch 3 train: 46 items in 1.2 s``
instead of thousands of carriage-return updates.
"""

import sys
import time
from typing import Any, Iterable, Iterator, Optional


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """tqdm's small API (iterate, ``update``, ``set_postfix``, ``close``) printing one line at close."""

    def __init__(self, iterable: Optional[Iterable[Any]] = None, desc: str = "", total: Optional[int] = None,
                 unit: str = "it", **_: Any) -> None:
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.n = 0
        self.postfix = ""
        self.t0 = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        for x in self.iterable or ():
            yield x
            self.n += 1
        self.close()

    def __len__(self) -> int:
        return len(self.iterable) if self.iterable is not None else int(self.total or 0)  # type: ignore[arg-type]

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        tail = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc}: {self.n} {self.unit} in {time.monotonic() - self.t0:.1f} s{tail}", file=sys.stderr,
              flush=True)


class _Silent(LineProgress):
    def close(self) -> None:
        self.closed = True


def progress(iterable: Optional[Iterable[Any]] = None, desc: str = "", total: Optional[int] = None,
             enabled: bool = True, unit: str = "it", leave: bool = False, per_stage_line: bool = True) -> Any:
    """A progress bar on a terminal, one summary line per stage otherwise (``per_stage_line=False``:
    nothing when not on a terminal, for inner loops whose caller prints its own line), nothing when
    disabled."""
    if not enabled:
        return _Silent(iterable, desc, total, unit)
    if stderr_is_tty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, dynamic_ncols=True)
    return LineProgress(iterable, desc, total, unit) if per_stage_line else _Silent(iterable, desc, total, unit)
