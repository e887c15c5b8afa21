"""The context every demo stage receives: run folder, settings, results so far, progress output.

Its own module so that the stages (``stages``, ``line``) and their driver (``run``) all import it
without importing each other.
"""

import os
import sys
from typing import Any, Callable, Dict, List


class Demo:
    """Run folder, settings, results shared between stages, and the progress printer."""

    def __init__(self, out: str, settings: Dict[str, Any], stream: Any = None) -> None:
        self.out = os.path.abspath(out)
        self.settings = settings
        self.results: Dict[str, Any] = {}
        self.stream = stream or sys.stdout
        self.cleanups: List[Callable[[], None]] = []

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def say(self, msg: str = "") -> None:
        print(msg, file=self.stream, flush=True)
