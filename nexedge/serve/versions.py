"""On-disk model versions of ``lifecycle.models_dir``: ``versions/<stem>-<sha8>/<artifact + card>``
and the atomically written ``active.json`` pointer a restart comes back on. Python 3.8, no torch."""

import json
import logging
import os
import shutil
import time
from typing import Any, Dict, Optional

from nexedge.card import CardError, atomic_write_bytes, card_path_for, read_card, sha256_file
from nexedge.serve.slots import LifecycleError, Slot

log = logging.getLogger("nexedge.serve")
POINTER = "active.json"
VERSIONS = "versions"


class Versions:
    """``models_dir``: ``versions/<stem>-<sha8>/<artifact + card>`` and the ``active.json`` pointer.

    A version is complete when its artifact and its card are both there: the card is written
    (atomically) before the artifact is renamed into place, so a crash in between leaves a card
    without artifact, never the reverse; an incomplete version is re-imported, or, named by the
    pointer, ignored with a log line."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(os.path.join(self.root, VERSIONS), exist_ok=True)

    @property
    def pointer_path(self) -> str:
        return os.path.join(self.root, POINTER)

    @staticmethod
    def _card_names(dest: str, sha256: str) -> bool:
        try:
            return read_card(card_path_for(dest)).sha256 == sha256
        except (CardError, OSError):
            return False

    def import_artifact(self, path: str, sha256: str) -> str:
        """Copy ``path`` and its card into a version folder (once); returns the copy's path."""
        path = os.path.abspath(path)
        if path.startswith(os.path.join(self.root, VERSIONS) + os.sep):
            return path
        stem = os.path.splitext(os.path.basename(path))[0]
        folder = os.path.join(self.root, VERSIONS, f"{stem}-{sha256[:8]}")
        dest = os.path.join(folder, os.path.basename(path))
        complete = self._card_names(dest, sha256)
        if os.path.exists(dest) and complete and sha256_file(dest) == sha256:
            return dest
        if os.path.exists(dest):
            log.warning("version %s is incomplete (%s); importing it again", folder,
                        "its card is missing or names other bytes" if not complete else "its artifact changed")
        os.makedirs(folder, exist_ok=True)
        with open(card_path_for(path), "rb") as f:
            card_bytes = f.read()
        atomic_write_bytes(card_path_for(dest), card_bytes)  # the card first: an artifact never lacks its card
        tmp = dest + ".part"
        shutil.copyfile(path, tmp)
        if sha256_file(tmp) != sha256:
            os.unlink(tmp)
            raise LifecycleError(f"{path} changed while it was copied into {folder}; load it again")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        if not self._card_names(dest, sha256):
            raise LifecycleError(f"{card_path_for(path)} changed while it was copied into {folder}; load it again")
        return dest

    def write(self, active: Slot, previous: Optional[Slot], who: str) -> None:
        doc = {"active": {"path": active.path, "sha256": active.sha256, "model_id": active.model_id},
               "previous": None if previous is None else {"path": previous.path, "sha256": previous.sha256,
                                                          "model_id": previous.model_id},
               "by": who, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_bytes(self.pointer_path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"))

    def read(self) -> Optional[Dict[str, Any]]:
        """The pointer's ``active`` entry, None when there is none; LifecycleError when it is unusable
        (unreadable, or naming a missing or incomplete version)."""
        if not os.path.exists(self.pointer_path):
            return None
        try:
            with open(self.pointer_path, encoding="utf-8") as f:
                doc = json.load(f)
            entry = doc["active"]
            path, sha = str(entry["path"]), str(entry["sha256"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LifecycleError(f"{self.pointer_path} is not a valid active pointer ({e})") from None
        if not os.path.isfile(path):
            raise LifecycleError(f"{self.pointer_path} names {path}, which does not exist")
        if not self._card_names(path, sha):
            raise LifecycleError(f"{self.pointer_path} names {path}, an incomplete version (its card "
                                 f"{card_path_for(path)} is missing or does not name sha256 {sha[:12]}); ignored")
        return {"path": path, "sha256": sha}
