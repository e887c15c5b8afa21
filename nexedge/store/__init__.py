"""nexedge.store: the uncertain-sample store (SQLite WAL rows + content-addressed image files).

Imported by the daemon: Python 3.8, no torch.
"""

from nexedge.store.files import blob_relpath, normalize_ext, write_atomic
from nexedge.store.samples import KINDS, SampleStore

__all__ = ["KINDS", "SampleStore", "blob_relpath", "normalize_ext", "write_atomic"]
