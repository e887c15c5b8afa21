"""Benchmark reports: terminal tables, Markdown, JSON files and ``--compare`` of two runs.

A result document (``nexedge.bench/1``) is the JSON :func:`nexedge.bench.cli.run_bench`
writes: ``env`` (see nexedge.bench.env), ``command``, ``date``, ``model``, ``results``
(one row per backend x precision x crops x batch with ``images_per_s`` and
``latency_ms`` {stage: stats}) and optionally ``gemm``/``flops``. Python 3.8.
"""

import json
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from nexedge.bench import stats
from nexedge.bench.runner import stage_order
from nexedge.card import atomic_write_bytes

SCHEMA = "nexedge.bench/1"
LAT_COLS = stats.STAT_KEYS


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}f}"
    return str(x)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    """Plain aligned text table (numbers right-aligned) or a GitHub Markdown table."""
    cells = [[_fmt(c) for c in r] for r in rows]
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in cells]
        return "\n".join(out)
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_num(r[i]) for r in rows) and rows for i in range(len(headers))]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) or x is None


def _label(r: Dict[str, Any]) -> Tuple[str, str, str, int]:
    return (r.get("backend", "?"), r.get("precision", "?"), "{}@{}".format(r.get("crops"), r.get("crops_where")),
            int(r.get("batch", 0)))


def summary_rows(doc: Dict[str, Any]) -> Tuple[List[str], List[List[Any]]]:
    headers = ["backend", "prec", "crops", "batch", "iters", "img/s"] + [f"{k} ms" for k in LAT_COLS]
    rows = []
    for r in doc["results"]:
        lat = r["latency_ms"]["e2e"]
        rows.append(list(_label(r)) + [r["iterations"], r["images_per_s"]] + [lat[k] for k in LAT_COLS])
    return headers, rows


def stage_rows(doc: Dict[str, Any]) -> Tuple[List[str], List[List[Any]]]:
    headers = ["backend", "prec", "crops", "batch", "stage", "mean ms", "median ms", "p99 ms", "share"]
    rows = []
    for r in doc["results"]:
        lat = r["latency_ms"]
        e2e = lat["e2e"]["mean"] or float("nan")
        for st in stage_order(list(lat)):
            if st in ("e2e", "total"):
                continue
            s = lat[st]
            rows.append(list(_label(r)) + [st, s["mean"], s["median"], s["p99"], f"{100.0 * s['mean'] / e2e:.0f}%"])
    return headers, rows


def flops_text(flops: float) -> str:
    """2.1e9 -> '2.10 GFLOP', 4.2e6 -> '4.20 MFLOP'."""
    for unit, scale in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f} FLOP"


def flops_lines(doc: Dict[str, Any]) -> List[str]:
    out = []
    g = doc.get("gemm")
    if g:
        for row in g["rows"]:
            unit = "GOP/s" if "u8s8" in row["kernel"] else "GFLOP/s"
            out.append("GEMM {} n={}: best {:.1f} {}, median {:.1f}".format(
                row["kernel"], row["n"], row["best_gflops"], unit, row["median_gflops"]))
    f = doc.get("flops")
    if f:
        out.append("model work: {} per graph row (batch 1){}".format(
            flops_text(f["flops"]),
            "" if not f.get("unresolved") else " (shapes unresolved for {} nodes: not counted)".format(
                len(f["unresolved"]))))
    for r in doc["results"]:
        u = r.get("utilisation")
        if u:
            frac = u.get("fraction_of_peak")
            out.append("{} {} crops {} batch {}: {}/image x {:.1f} img/s = {:.1f} GFLOP/s = {} of the "
                       "{} GEMM peak".format(
                r["backend"], r["precision"], r["crops"], r["batch"], flops_text(r["flops_per_image"]),
                r["images_per_s"], u["achieved_gflops"],
                "-" if frac is None else f"{100 * frac:.0f}%", u.get("peak_kind", "fp32")))
    return out


def render(doc: Dict[str, Any], markdown: bool = False) -> str:
    """The whole report: header, throughput/latency table, per-stage table, GFLOP/s lines."""
    from nexedge.bench.env import one_line

    m = doc.get("model") or {}
    parts = [
        "model: {} ({} {}, sha256 {}; input {} crops {})".format(
            m.get("path"), m.get("kind"), m.get("precision"), (m.get("sha256") or "?")[:12],
            (m.get("input") or {}).get("resize"), m.get("graph_crops")),
        "machine: " + one_line(doc.get("env") or {}),
        "date: {}   command: {}".format(doc.get("date"), doc.get("command")),
        "",
        "end-to-end per batch (latency of one infer() call{}):".format(
            ", including decode" if any(r.get("input") == "files" for r in doc["results"]) else ""),
        table(*summary_rows(doc), markdown=markdown),
        "",
        "by stage:",
        table(*stage_rows(doc), markdown=markdown),
    ]
    extra = flops_lines(doc)
    if extra:
        parts += [""] + extra
    plans = [r for r in doc["results"] if r.get("plan")]
    if plans:
        parts += [""] + ["{} batch {}: stage-2 share {:.1%} at threshold {:.6g} ({} input)".format(
            r["plan"], r["batch"], r["stage2_fraction"], r["threshold"], r.get("input")) for r in plans]
    return "\n".join(parts)


def write_markdown(path: str, text: str) -> None:
    """Write a benchmark's Markdown section to ``path`` (folders made as needed) and say so."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {path}")


def emit(render: Callable[[bool], str], markdown_path: Optional[str] = None) -> None:
    """Print a section as plain text and, given a path, also write it as Markdown there."""
    print(render(False))
    if markdown_path:
        write_markdown(markdown_path, render(True))


def save_json(doc: Dict[str, Any], path: str) -> None:
    atomic_write_bytes(path, (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def load_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"benchmark result file not found: {path}") from None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("results"), list):
        raise ValueError(f"{path} is not a nexedge bench result (expected schema {SCHEMA!r} with 'results')")
    return doc


def compare(a: Dict[str, Any], b: Dict[str, Any], markdown: bool = False,
            names: Optional[Tuple[str, str]] = None) -> str:
    """Side by side: rows matched on (crops, batch) and, where both runs share them, backend and precision;
    ratios are B / A (throughput above 1 and latency below 1 mean B is faster)."""
    na, nb = names or ("A", "B")

    def key(r: Dict[str, Any], full: bool) -> Tuple[Any, ...]:
        lab = _label(r)
        return lab if full else (r.get("crops"), lab[3])

    full = {key(r, True) for r in a["results"]} & {key(r, True) for r in b["results"]}
    use_full = bool(full)
    bmap = {key(r, use_full): r for r in b["results"]}
    headers = ["crops", "batch", f"{na} img/s", f"{nb} img/s", "B/A", f"{na} p50 ms", f"{nb} p50 ms", "B/A",
               f"{na} p99 ms", f"{nb} p99 ms", "B/A"]
    rows, missing = [], []
    for ra in a["results"]:
        rb = bmap.pop(key(ra, use_full), None)
        if rb is None:
            missing.append(f"only in {na}: " + " ".join(str(x) for x in _label(ra)))
            continue
        la, lb = ra["latency_ms"]["e2e"], rb["latency_ms"]["e2e"]
        crops = _label(ra)[2] if _label(ra)[2] == _label(rb)[2] else f"{_label(ra)[2]} vs {_label(rb)[2]}"
        rows.append([crops, ra["batch"], ra["images_per_s"], rb["images_per_s"],
                     stats.ratio(ra["images_per_s"], rb["images_per_s"]),
                     la["median"], lb["median"], stats.ratio(la["median"], lb["median"]),
                     la["p99"], lb["p99"], stats.ratio(la["p99"], lb["p99"])])
    missing += [f"only in {nb}: " + " ".join(str(x) for x in _label(r)) for r in bmap.values()]
    from nexedge.bench.env import one_line

    head = []
    for n, d in ((na, a), (nb, b)):
        m = d.get("model") or {}
        head.append("{}: {} ({} {}) on {}".format(n, m.get("file"), m.get("kind"), m.get("precision"),
                                                  one_line(d.get("env") or {})))
    if (a.get("env") or {}).get("cpu") != (b.get("env") or {}).get("cpu"):
        head.append("note: the two runs are from different CPUs")
    if not rows:
        raise ValueError("the two result files have no (crops, batch) configuration in common")
    return "\n".join(head + ["", table(headers, rows, markdown=markdown)] + missing)
