"""``nexedge keys``: CurveZMQ key pairs for the daemon and its clients."""

import os
from typing import Dict

from nexedge.serve.auth import make_keypair


def make_keys(out_dir: str, name: str) -> Dict[str, str]:
    """Write ``<name>.key`` (public, share it) and ``<name>.key_secret`` (keep it; mode 600)."""
    public, secret = make_keypair(out_dir, name)
    return {"public": os.path.abspath(public), "secret": os.path.abspath(secret)}


def usage_note(paths: Dict[str, str], name: str) -> str:
    return (
        f"wrote {paths['public']} (public) and {paths['secret']} (secret, keep private)\n"
        f"- a daemon uses {name}.key_secret as auth.server_secret_file; clients need {name}.key as --server-key\n"
        f"- a client uses {name}.key_secret as --client-key; copy {name}.key into the daemon's "
        "auth.allowed_clients_dir to let it in (delete it there to revoke)"
    )
