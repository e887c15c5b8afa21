"""Import cycles between nexedge modules, lazy imports (inside functions) included.

A cycle closed by an import inside a function does not fail at import time, so Python never reports
it; it still ties the modules together (neither can be understood, tested or moved alone). This reads
every ``import`` from the source (no module is imported), resolves it to a nexedge module, and lists
the simple cycles of the graph. Imports under ``if TYPE_CHECKING:`` never run and are left out.

    python tools/check_imports.py          # prints every cycle; exit 1 if there is one

tests/test_architecture.py fails on any cycle not in its allow-list.
"""

import ast
import os
import sys
from typing import Dict, List, Optional, Set, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Edge = Tuple[str, str]


def _modules(root: str) -> Dict[str, str]:
    """Module name -> path for every .py file under ``root``/nexedge."""
    out = {}
    for base, dirs, files in os.walk(os.path.join(root, "nexedge")):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in files:
            if f.endswith(".py"):
                parts = os.path.relpath(os.path.join(base, f), root)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = os.path.join(base, f)
    return out


def _type_checking_only(node: ast.AST, parents: Dict[ast.AST, ast.AST]) -> bool:
    p = parents.get(node)
    while p is not None:
        if isinstance(p, ast.If) and "TYPE_CHECKING" in ast.dump(p.test):
            return True
        p = parents.get(p)
    return False


def _function(node: ast.AST, parents: Dict[ast.AST, ast.AST]) -> Optional[str]:
    p = parents.get(node)
    while p is not None:
        if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return p.name
        p = parents.get(p)
    return None


def import_graph(root: str = REPO) -> Dict[Edge, List[str]]:
    """(importer, imported) -> where: ``"line N"`` at module level or ``"line N in fn()"`` (lazy)."""
    mods = _modules(root)

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges: Dict[Edge, List[str]] = {}
    for mod, path in sorted(mods.items()):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        is_pkg = path.endswith("__init__.py")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from . import x / from ..a import b
                    base = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    pkg = f"{base}.{node.module}" if node.module else base
                else:
                    pkg = node.module or ""
                targets = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in mods else pkg for a in node.names]
            else:
                continue
            if _type_checking_only(node, parents):
                continue
            fn = _function(node, parents)
            where = f"line {node.lineno}" + (f" in {fn}()" if fn else "")
            for t in targets:
                dst = resolve(t) if t.startswith("nexedge") else ""
                # A module importing its own package (or the top package) is not an edge between ideas.
                if dst and dst != mod and dst != "nexedge" and not mod.startswith(dst + "."):
                    seen = edges.setdefault((mod, dst), [])
                    if where not in seen:  # from x import (a, b, ...): one line
                        seen.append(where)
    return edges


def cycles(edges: Dict[Edge, List[str]]) -> List[Tuple[str, ...]]:
    """Every simple cycle, as a tuple starting at its smallest module (so each appears once)."""
    adj: Dict[str, Set[str]] = {}
    for a, b in edges:
        adj.setdefault(a, set()).add(b)
    out: List[Tuple[str, ...]] = []

    def walk(start: str, v: str, path: List[str]) -> None:
        for w in sorted(adj.get(v, ())):
            if w == start:
                out.append(tuple(path))
            elif w > start and w not in path:
                walk(start, w, path + [w])

    for start in sorted(adj):
        walk(start, start, [start])
    return out


def describe(cycle: Tuple[str, ...], edges: Dict[Edge, List[str]]) -> str:
    """``a -[line 3]-> b -[line 40 in f()]-> a``."""
    closed = list(cycle) + [cycle[0]]
    return " ".join(f"{a} -[{', '.join(edges[(a, b)])}]->" for a, b in zip(closed, closed[1:])) + f" {cycle[0]}"


def main() -> int:
    edges = import_graph(sys.argv[1] if len(sys.argv) > 1 else REPO)
    found = cycles(edges)
    lazy = sum(1 for where in edges.values() if all(" in " in w for w in where))
    print(f"{len(edges)} import edges between nexedge modules ({lazy} only inside functions), "
          f"{len(found)} cycle(s)")
    for c in found:
        print("  " + describe(c, edges))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
