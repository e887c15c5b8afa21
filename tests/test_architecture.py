"""Structure rules: no import cycle between nexedge modules (the allow-list is empty and only
shrinks), the daemon side imports nothing above it, constants have one home, cards change only
through ModelCard's writers.

Imports inside functions count: a cycle they close does not fail at import time, but it still ties
the modules together. tools/check_imports.py reads the imports from the source (and prints them:
``python tools/check_imports.py``).
"""

import ast
import importlib.util
import os
from typing import List, Set, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("check_imports", os.path.join(REPO, "tools", "check_imports.py"))
check_imports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_imports)

# Cycles not yet broken, each to be broken by moving the shared idea into a module of its own; remove
# an entry when its cycle is gone (the test says so). Never add one. Empty: no cycle is allowed.
ALLOWED_CYCLES: Set[Tuple[str, ...]] = set()


def test_no_new_import_cycle():
    edges = check_imports.import_graph(REPO)
    found = set(check_imports.cycles(edges))
    new = sorted(found - ALLOWED_CYCLES)
    assert not new, "new import cycle(s) between nexedge modules (move the shared idea into a module both " \
        "can import):\n" + "\n".join(check_imports.describe(c, edges) for c in new)
    gone = sorted(ALLOWED_CYCLES - found)
    assert not gone, f"cycle(s) no longer there: remove them from ALLOWED_CYCLES: {gone}"


_BASE = {"card", "metrics", "preprocess"}
# The daemon side reaches nothing above it ("nothing reaches back up the chain"): package -> the
# nexedge packages its modules may import (lazy imports included).
DAEMON_SIDE_MAY_IMPORT = {
    "card": _BASE, "metrics": _BASE, "preprocess": _BASE,
    "runtime": _BASE | {"runtime", "threads"},
    "store": _BASE | {"store"},
    "serve": _BASE | {"serve", "runtime", "store", "threads"},
}
UPWARD_EDGES = {
    ("nexedge.runtime.backends.torch", "nexedge.models.checkpoint"),  # the torch backend opens .pt checkpoints
    # the `nexedge camera-sim/line` and `nexedge store` commands take the shared CLI options (torch-free, py3.8)
    ("nexedge.serve.cli", "nexedge.cliopts"), ("nexedge.store.cli", "nexedge.cliopts"),
}


def test_daemon_side_imports_nothing_above_it():
    def package(mod):
        return mod.split(".")[1]

    edges = check_imports.import_graph(REPO)
    up = {(a, b) for a, b in edges
          if package(a) in DAEMON_SIDE_MAY_IMPORT and package(b) not in DAEMON_SIDE_MAY_IMPORT[package(a)]}
    assert up - UPWARD_EDGES == set(), "\n".join(f"{a} -> {b} ({', '.join(edges[(a, b)])})"
                                              for a, b in sorted(up - UPWARD_EDGES))
    assert UPWARD_EDGES <= up, "an upward edge is gone: remove it from UPWARD_EDGES"


def test_cycle_finder_sees_lazy_imports_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "nexedge"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from nexedge.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import X\n")  # lazy and relative
    (pkg / "c.py").write_text("import nexedge.a as a\n")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from nexedge import a\n"
                              "import nexedge.c\n")
    edges = check_imports.import_graph(str(tmp_path))
    assert edges[("nexedge.sub.b", "nexedge.c")] == ["line 2 in f()"]
    assert ("nexedge.d", "nexedge.a") not in edges and ("nexedge.d", "nexedge.c") in edges
    assert check_imports.cycles(edges) == [("nexedge.a", "nexedge.sub.b", "nexedge.c")]
    assert check_imports.describe(("nexedge.a", "nexedge.sub.b", "nexedge.c"), edges) == (
        "nexedge.a -[line 1]-> nexedge.sub.b -[line 2 in f()]-> nexedge.c -[line 1]-> nexedge.a")


def test_image_suffixes_have_one_home():
    """Image file suffixes are listed in nexedge/images.py (files read from disk) and
    nexedge/serve/decode.py (what the daemon decodes) only, and the two agree."""
    from nexedge.images import READ_EXTS
    from nexedge.serve.decode import EXT, SUFFIXES

    assert set(SUFFIXES) == set(READ_EXTS) and set(SUFFIXES.values()) == set(EXT)
    found = set()
    for base, _dirs, files in os.walk(os.path.join(REPO, "nexedge")):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(base, f)
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            for node in ast.walk(tree):
                if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                    items = node.keys if isinstance(node, ast.Dict) else node.elts
                    words = [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)]
                    if {".png", ".jpg"} <= set(w.lower() for w in words):
                        found.add(os.path.relpath(path, REPO))
    assert found == {"nexedge/images.py", "nexedge/serve/decode.py"}


_MUTATORS = {"update", "setdefault", "pop", "popitem", "append", "extend", "clear", "insert", "remove"}


def _raw_card_writes(path: str) -> List[str]:
    """``card.data[...] = ...``, ``del``, augmented assignments and mutating calls on a card's ``.data``
    (any name ending in ``card``) in one source file: "line: code" per write."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    tree = ast.parse(text)

    def on_card_data(node: ast.AST) -> bool:
        while isinstance(node, (ast.Subscript, ast.Attribute)):
            if isinstance(node, ast.Attribute) and node.attr == "data":
                root = ast.unparse(node.value).split(".")[-1].lower()
                return root.endswith("card")
            node = node.value
        return False

    hits = []
    for node in ast.walk(tree):
        targets: List[ast.AST] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _MUTATORS:
            targets = [node.func.value]
        if any(isinstance(t, (ast.Subscript, ast.Attribute)) and on_card_data(t)
               and not (isinstance(t, ast.Attribute) and t.attr == "data") for t in targets) or any(
                isinstance(node, ast.Call) and isinstance(t, ast.Attribute) and t.attr == "data" and on_card_data(t)
                for t in targets):
            hits.append(f"{node.lineno}: {ast.get_source_segment(text, node)}")
    return hits


def test_cards_change_only_through_their_writers():
    """Outside nexedge/card.py, package and benchmark code change a card through ModelCard's writers
    (validated where they are called), never by writing into ``card.data`` (tests may, to build
    malformed cards)."""
    found = {}
    for top in ("nexedge", "benchmarks"):
        for base, _dirs, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                path = os.path.join(base, f)
                rel = os.path.relpath(path, REPO)
                if f.endswith(".py") and rel != os.path.join("nexedge", "card.py"):
                    hits = _raw_card_writes(path)
                    if hits:
                        found[rel] = hits
    assert not found, f"raw writes into card.data (use the ModelCard writers): {found}"


def test_raw_card_write_finder_sees_each_kind_of_write(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('card.data["a"] = 1\nicard.data["graph"]["x"] += 1\ndel new_card.data["b"]\n'
                   'card.data["provenance"].pop("k")\ncard.data.update(a=1)\n'
                   'x = card.data["a"]\ny = card.data.get("a")\nself.data["a"] = 2\ncard.data = {}\n')
    assert [h.split(":")[0] for h in _raw_card_writes(str(src))] == ["1", "2", "3", "4", "5"]


def one_letter_module_aliases(roots: List[str]) -> List[str]:
    """``path:line`` of each nexedge module imported under a one-letter name (``import x as C``)."""
    found = []
    for root in roots:
        for base, _dirs, files in os.walk(root):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(base, name)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), path)
                for node in ast.walk(tree):
                    if not isinstance(node, (ast.Import, ast.ImportFrom)):
                        continue
                    mod = getattr(node, "module", None) or ""
                    for alias in node.names:
                        full = f"{mod}.{alias.name}" if mod else alias.name
                        if full.startswith("nexedge") and alias.asname and len(alias.asname) == 1:
                            found.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
    return found


def test_nexedge_modules_are_not_imported_under_one_letter_names():
    """``from nexedge.serve import config as C`` makes a reader look up what ``C`` is in every file."""
    roots = [os.path.join(REPO, d) for d in ("nexedge", "tests", "benchmarks", "tools")]
    assert one_letter_module_aliases(roots) == []


def test_one_letter_alias_finder_sees_both_import_forms(tmp_path):
    (tmp_path / "a.py").write_text("import nexedge.serve.config as C\nfrom nexedge import preprocess as P\n"
                                   "import numpy as n\nfrom nexedge import card as card_mod\n")
    assert [s.rsplit(":", 1)[1] for s in one_letter_module_aliases([str(tmp_path)])] == ["1", "2"]


def _compat_paths() -> List[str]:
    """The paths ``make compat`` checks for Python 3.8 (DAEMON_MODULES and DEVICE_MODULES)."""
    import re

    with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
        text = f.read()
    return [p for var in ("DAEMON_MODULES", "DEVICE_MODULES")
            for p in re.search(rf"^{var} := (.*)$", text, re.M).group(1).split()]


def test_python38_check_covers_what_a_line_install_imports_for_help():
    """A Jetson (JetPack 5: Python 3.8) imports these modules for `nexedge --help` and the daemon's
    parser; a 3.9+ construct in one that vermin does not check breaks the install before the first frame."""
    import subprocess
    import sys

    code = ("import sys, nexedge.cli as c, nexedge.serve.daemon as d; c.build_parser(); d.build_parser(); "
            "print('\\n'.join(m for m in sys.modules if m.startswith('nexedge')))")
    mods = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=REPO).stdout.split()
    paths = _compat_paths()

    def covered(mod: str) -> bool:
        p = mod.replace(".", "/")
        return any(x in (p + ".py", p + "/__init__.py") or (p + "/").startswith(x.rstrip("/") + "/")
                   for x in paths)

    assert mods and [m for m in mods if not covered(m)] == []
