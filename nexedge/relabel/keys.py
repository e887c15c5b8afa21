"""``nexedge keys``: CurveZMQ key pairs for the daemon and its clients, with the client's role."""

import os
import shutil
from typing import Dict, Optional

from nexedge.serve.auth import ROLE_DIRS, make_keypair


def make_keys(out_dir: str, name: str) -> Dict[str, str]:
    """Write ``<name>.key`` (public, share it) and ``<name>.key_secret`` (keep it; mode 600)."""
    public, secret = make_keypair(out_dir, name)
    return {"public": os.path.abspath(public), "secret": os.path.abspath(secret)}


def allow_key(public: str, allowed_dir: str, role: str) -> str:
    """Copy a public key into the role's folder of an allow-list (refusing to overwrite); returns its path."""
    if role not in ROLE_DIRS:
        raise ValueError(f"role {role!r}; expected one of {sorted(ROLE_DIRS)}")
    folder = os.path.join(allowed_dir, ROLE_DIRS[role])
    os.makedirs(folder, exist_ok=True)
    dest = os.path.join(folder, os.path.basename(public))
    if os.path.exists(dest):
        raise ValueError(f"{dest} exists; refusing to overwrite an allowed key (remove it first)")
    shutil.copyfile(public, dest)
    return os.path.abspath(dest)


def usage_note(paths: Dict[str, str], name: str, role: Optional[str] = None, allowed: Optional[str] = None) -> str:
    dirs = ", ".join(f"{d}/ ({r})" for r, d in ROLE_DIRS.items())
    lines = [
        f"wrote {paths['public']} (public) and {paths['secret']} (secret, keep private)",
        f"- a daemon uses {name}.key_secret as auth.server_secret_file; clients need {name}.key as --server-key",
        f"- a client uses {name}.key_secret as --client-key; its {name}.key goes into the daemon's "
        f"auth.allowed_clients_dir, in the folder of its role: {dirs} (delete it there to revoke)",
    ]
    if allowed:
        lines.append(f"- allowed as {role}: {allowed}")
    elif role:
        lines.append(f"- as a {role}: copy {name}.key into ALLOWED/{ROLE_DIRS[role]}/ (or rerun with --allow)")
    return "\n".join(lines)
