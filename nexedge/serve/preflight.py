"""Pre-flight checks of a daemon config against the machine: every file it names exists and can be
read (the store's folder written) by the user the service runs as, checked by permission bits for
another user (``--check-config --user``, ``nexedge doctor``). Python 3.8, no torch."""

import os
from typing import List, Optional

from nexedge.serve.config import Config, ConfigError


def can_access(path: str, want: int, user: Optional[str] = None) -> bool:
    """``os.access`` for this process, or by the permission bits for another ``user`` (the unit's User=),
    including search permission on every parent folder. ``want``: os.R_OK | os.W_OK | os.X_OK."""
    if user is None:
        return os.access(path, want)
    import grp  # noqa: F401  (POSIX only; imported here so the module loads anywhere)
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"--user {user!r}: no such user on this machine") from None
    if pw.pw_uid == 0:
        return os.path.exists(path)
    groups = set(os.getgrouplist(user, pw.pw_gid))

    def bits(p: str) -> int:
        st = os.stat(p)
        if st.st_uid == pw.pw_uid:
            return (st.st_mode >> 6) & 7
        if st.st_gid in groups:
            return (st.st_mode >> 3) & 7
        return st.st_mode & 7

    try:
        parent = os.path.dirname(os.path.abspath(path))
        while True:
            if not bits(parent) & os.X_OK:
                return False
            up = os.path.dirname(parent)
            if up == parent:
                break
            parent = up
        return (bits(path) & want) == want
    except OSError:
        return False


def check_files(cfg: Config, user: Optional[str] = None) -> List[str]:
    """Problems with the files the config names: missing, or not readable (writable for the store)
    by ``user`` (default: this process). An empty list means the daemon can open them all."""
    from nexedge.card import card_path_for

    who = f"user {user!r}" if user else "this user"
    problems: List[str] = []

    def need_file(key: str, path: str, what: str) -> None:
        if not os.path.exists(path):
            problems.append(f"{key}: {what} {path} does not exist")
        elif not os.path.isfile(path):
            problems.append(f"{key}: {what} {path} is not a file")
        elif not can_access(path, os.R_OK, user):
            problems.append(f"{key}: {what} {path} is not readable by {who}")

    need_file("model.path", cfg.model.path, "model")
    if os.path.isfile(cfg.model.path):
        n = len(problems)
        need_file("model.path", card_path_for(cfg.model.path), "model card")
        if len(problems) == n and os.access(card_path_for(cfg.model.path), os.R_OK):
            from nexedge.card import CardError, load_card

            try:
                load_card(cfg.model.path, verify=cfg.model.verify_card)
            except (CardError, ValueError, OSError) as e:
                problems.append(f"model.path: {e}")
    if cfg.auth is not None:
        need_file("auth.server_secret_file", cfg.auth.server_secret_file, "server key")
        d = cfg.auth.allowed_clients_dir
        if not os.path.isdir(d):
            problems.append(f"auth.allowed_clients_dir: {d} is not a folder")
        elif not can_access(d, os.R_OK | os.X_OK, user):
            problems.append(f"auth.allowed_clients_dir: {d} is not readable by {who}")
    if cfg.store is not None:
        p = cfg.store.path
        while not os.path.exists(p) and os.path.dirname(p) != p:
            p = os.path.dirname(p)  # the daemon creates the missing part: the nearest existing folder counts
        if not os.path.isdir(p) or not can_access(p, os.W_OK | os.X_OK, user):
            problems.append(f"store.path: {cfg.store.path} cannot be created or written by {who} ({p} is not a "
                            "writable folder)")
    return problems
