#!/usr/bin/env python3
"""The one benchmark entry point: run the comparison scripts, then rewrite benchmarks/RESULTS.md.

Each section is a script ``benchmarks/bench_<name>.py`` that measures things side by
side in one run and writes its Markdown section with ``--markdown PATH``
(``benchmarks/results/<name>.md``). This script runs the selected sections one after
another (never in parallel: they would share the CPU), keeps each one's output in
``benchmarks/results/<name>.log``, and assembles RESULTS.md from the machine
information, the date, the exact command and every section file. Sections not run
this time are taken from their existing files (their own date and machine stay in
them), so a long section such as training need not be rerun to refresh the others. A hand-kept
``benchmarks/results/<name>.history.md`` (earlier, dated measurements no script writes) is
appended after its section.

    python benchmarks/run_all.py                    # everything (training takes long)
    python benchmarks/run_all.py --skip trainer     # all but training; reuse its last file
    python benchmarks/run_all.py --only gemm        # one section; the rest reused
    python benchmarks/run_all.py --reuse            # only the sections with no file yet
"""

import argparse
import datetime as _dt
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from typing import IO, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")
PATHS = {"results": RESULTS_DIR, "output": RESULTS_MD}

#: (name, script, what it compares). Order = order in RESULTS.md.
SECTIONS: List[Tuple[str, str, str]] = [
    ("backends", "bench_backends.py",
     "torch fp32 vs ONNX Runtime fp32 vs ONNX Runtime INT8 (U8S8), batch 1 and 10; host vs in-graph TenCrop"),
    ("gemm", "bench_gemm.py", "achieved GFLOP/s of inference vs a GEMM measured on the same machine in the same run"),
    ("int8", "bench_int8.py", "ONNX Runtime INT8 settings (U8S8/U8U8/S8S8, per-channel/tensor, reduce_range) vs fp32 "
     "per arch and flavour; profile of the quantized graph vs the INT8 GEMM peak; AUC and escapes"),
    ("fold", "bench_fold.py", "EfficientNet-Lite0 with its TF \"same\" Pads folded into the Conv pads vs kept: "
     "ORT fp32 and INT8 TenCrop time side by side, op counts, score difference"),
    ("int8_stem", "bench_int8_stem.py", "INT8 with the stem convolutions float vs quantized, on trained demo models: "
     "test AUC, FPR at TPR 100 %, good PASSed and escapes at the own validation threshold, TenCrop time"),
    ("cascade", "bench_cascade.py", "cascade TenCrop vs full TenCrop: decisions, escapes, stage-2 share; daemon "
     "throughput and p99 latency (ORT INT8)"),
    ("daemon", "bench_daemon.py", "daemon end to end over loopback vs the bare backend; latency at 50% and 100% load"),
    ("memory", "bench_memory.py", "daemon RSS under the issue-30 attacks (many-part, unfinished, tiny-part messages on "
     "frames, control, pull) against a stated ceiling, and after floods; this code vs main"),
    ("decode_attack", "bench_decode_attack.py", "progressive-JPEG scan bombs against 4 honest cameras: honest RECHECK "
     "share and latency, this code vs main"),
    ("soak", "bench_soak.py", "daemon soak: 8 cameras at 80% of capacity + 1% hostile traffic; lost, late, RSS slope "
     "(30 min by default, long)"),
    ("lifecycle", "bench_lifecycle.py", "throughput with a shadow candidate on vs off; active model's p99 latency "
     "steady vs during hot swaps"),
    ("rollback", "bench_rollback.py", "automatic rollback and promotion rules by simulation: false- and missed-rollback "
     "rates per hour at 1/10/50 devices/s and 0.2-5 % rejects (new limits vs the old 3-sigma chart); promotion of "
     "adversarial candidates"),
    ("load_probe", "bench_load_probe.py", "a model load with lifecycle.memory_limit (checked in a child process) vs "
     "without: load time, and the daemon's peak RSS while a small model that builds a large constant is loaded"),
    ("shift", "bench_shift.py", "shift alarm: frames to alarm on batch 3 after batch 2, false alarms on batch 2"),
    ("shift_scores", "bench_shift_scores.py", "shift monitor PSI: false alarms on an in-distribution line and "
     "detection delay per drift; [0,1] bins with the validation mix vs log-odds bins with the line's prior"),
    ("trainer", "bench_trainer.py", "CE vs SAT under label noise, CenterCrop vs TenCrop, mislabel ranking (long); Lite0 training speed-ups"),
    ("contention", "bench_contention.py", "a short training (magnetic tiles) quiet vs beside an identical one, "
     "OpenMP threads spinning vs sleeping: time ratio vs quiet (target <= 2.2x)"),
    ("resize_mode", "bench_resize_mode.py", "--resize-mode stretch vs short on the magnetic tiles' mixed aspect "
     "ratios, each trained with --budget: test AUC, accuracy, escapes, time taken vs budget"),
    ("line_tail", "bench_line_tail.py", "the demo's models on 2,000 held-out images: good devices PASSed at TPR "
     "99.1-100 %, AUC per class and defect mode, the demo's line criterion simulated on random splits"),
    ("tiles", "bench_tiles.py", "the magnetic tiles (real images) through the CLI: split, train, export --crops auto, "
     "eval against issue 27's targets; --cv K and the fold ensemble (long)"),
    ("crops", "bench_crops.py", "CenterCrop / FiveCrop / TenCrop with mean-of-logits or max-defect-score aggregation "
     "from one TenCrop pass: AUC, FPR at TPR 99.1 and 100 %, escapes and overkill at the validation threshold"),
    ("realism", "bench_realism.py", "synthetic looks (legacy vs calibrated) against real line images: region "
     "intensities, noise spectra, KID, real-vs-synthetic classifier, render cost, models trained on synthetic "
     "data scoring the real references"),
]
NAMES = [s[0] for s in SECTIONS]


def parse_names(text: Optional[str], flag: str) -> List[str]:
    if not text:
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in NAMES]
    if bad:
        raise SystemExit(f"run_all.py: {flag} {','.join(bad)}: unknown section; expected some of {','.join(NAMES)}")
    return names


def _commit_time(path: str) -> Optional[str]:
    """UTC time of the last commit of ``path`` when git tracks it unmodified, else None."""
    path = os.path.abspath(path)
    here = os.path.dirname(path)
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--", path], cwd=here, capture_output=True,
                               text=True, timeout=10)
        log = subprocess.run(["git", "log", "-1", "--format=%ct", "--", path], cwd=here, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if dirty.returncode or dirty.stdout.strip() or log.returncode or not log.stdout.strip():
        return None
    t = _dt.datetime.fromtimestamp(int(log.stdout.strip()), _dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M UTC")


def section_date(path: str) -> str:
    """When a section file was measured: the first UTC time stamp it writes, else the time of its last
    commit, else its file time (which a git checkout or merge resets, so it is named as such)."""
    with open(path, encoding="utf-8") as f:
        m = re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", f.read(4000))
    if m:
        return m.group(0)
    committed = _commit_time(path)
    if committed:
        return committed + " (committed)"
    mtime = _dt.datetime.fromtimestamp(os.path.getmtime(path), _dt.timezone.utc)
    return mtime.strftime("%Y-%m-%d %H:%M UTC") + " (file time)"


def section_path(name: str) -> str:
    return os.path.join(PATHS["results"], f"{name}.md")


def history_path(name: str) -> str:
    """Hand-kept earlier measurements of a section (dated), appended after it; no script writes it."""
    return os.path.join(PATHS["results"], f"{name}.history.md")


def _copy_output(stream: IO[bytes], logf: IO[bytes]) -> None:
    """Echo a section's output to the terminal and its log as it comes."""
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(line)
        sys.stdout.flush()
        logf.write(line)


def run_section(name: str, script: str, extra: Sequence[str], timeout: float) -> Dict[str, object]:
    """Run one section script with ``--markdown``; returns status, seconds and the log path."""
    path = os.path.join(HERE, script)
    log = os.path.join(PATHS["results"], f"{name}.log")
    if not os.path.exists(path):
        return {"status": "missing", "seconds": 0.0, "log": None,
                "error": f"benchmarks/{script} is not in this checkout"}
    out = section_path(name)
    # the script runs in ROOT and prints its own command into the section: keep that path repo-relative
    inside = os.path.commonpath([os.path.abspath(out), ROOT]) == ROOT
    cmd = [sys.executable, path, "--markdown", os.path.relpath(out, ROOT) if inside else out] + list(extra)
    print(f"\n=== {name}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    t0 = time.perf_counter()
    before = os.path.getmtime(out) if os.path.exists(out) else None
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        reader = threading.Thread(target=_copy_output, args=(proc.stdout, logf), daemon=True)
        reader.start()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            reader.join(5)
            return {"status": "timeout", "seconds": time.perf_counter() - t0, "log": log,
                    "error": f"killed after {timeout:.0f} s (--timeout)"}
        reader.join(5)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"status": "failed", "seconds": secs, "log": log, "error": f"exit status {proc.returncode}"}
    if not os.path.exists(out) or (before is not None and os.path.getmtime(out) == before):
        return {"status": "failed", "seconds": secs, "log": log, "error": f"{script} wrote no {out}"}
    return {"status": "ran", "seconds": secs, "log": log}


def machine_block() -> List[str]:
    sys.path.insert(0, ROOT)
    from nexedge.bench.env import capture

    e = capture()
    libs = ", ".join(f"{k} {v}" for k, v in (e.get("libraries") or {}).items() if v)
    rows = [
        ("CPU", f"{e.get('cpu')} ({e.get('machine')}), {e.get('cores_usable')} of {e.get('cores_online')} cores usable"),
        ("GPU", e.get("gpu") or "none"),
        ("OS", f"{e.get('platform')}, Python {e.get('python')}"),
        ("libraries", libs),
        ("load average at assembly", " ".join(str(x) for x in e.get("load_average") or []) or "-"),
    ]
    jet = e.get("jetson")
    if jet:
        rows.append(("Jetson", f"{jet.get('model')}, L4T {jet.get('l4t')}, power mode {jet.get('power_mode')}, "
                               f"clocks locked {jet.get('clocks_locked')}"))
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def assemble(argv: Sequence[str], statuses: Dict[str, Dict[str, object]], started: str) -> str:
    lines = [
        "# Benchmark results",
        "",
        "Written by `benchmarks/run_all.py`; do not edit by hand (edit the scripts and rerun).",
        "Every number below was measured; each section names its own machine, date and command.",
        "",
        f"- assembled: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} (run started {started})",
        "- command: `" + " ".join(["python", "benchmarks/run_all.py"] + [shlex.quote(a) for a in argv]) + "`",
        "",
        "## Machine",
        "",
    ] + machine_block() + ["", "## Sections", "", "| section | compares | this run |", "|---|---|---|"]
    for name, _script, what in SECTIONS:
        st = statuses[name]
        note = {"ran": "measured now ({:.0f} s)".format(float(st.get("seconds", 0.0))),
                "reused": "reused section file from {}".format(st.get("mtime")),
                }.get(str(st["status"]), "**{}**: {}".format(st["status"], st.get("error", "")))
        lines.append(f"| [{name}](#{name}) | {what} | {note} |")
    for name, script, what in SECTIONS:
        st = statuses[name]
        lines += ["", f"<a id=\"{name}\"></a>", ""]
        path = section_path(name)
        if st["status"] in ("ran", "reused") and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                body = f.read().strip()
            if st["status"] == "reused":
                lines.append(f"*(not rerun by this command; section file `{os.path.relpath(path, ROOT)}` "
                             f"from {st.get('mtime')})*")
                lines.append("")
            lines.append(body)
            if os.path.exists(history_path(name)):
                with open(history_path(name), encoding="utf-8") as f:
                    lines += ["", f.read().strip()]
        else:
            lines += [f"## {name}", "", f"Not measured: {st['status']} — {st.get('error', '')}. "
                      f"Run `python benchmarks/{script} --markdown benchmarks/results/{name}.md` ({what})."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="sections: " + ", ".join(NAMES))
    p.add_argument("--only", help="comma-separated sections to run (others are reused from their files)")
    p.add_argument("--skip", help="comma-separated sections not to run (reused from their files)")
    p.add_argument("--reuse", action="store_true", help="do not rerun a selected section that already has a file")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per section (default 3600)")
    p.add_argument("--list", action="store_true", help="list the sections and exit")
    p.add_argument("--results-dir", default=RESULTS_DIR, help="folder of section files (default benchmarks/results)")
    p.add_argument("--output", default=RESULTS_MD, help="file to write (default benchmarks/RESULTS.md)")
    p.add_argument("--section-args", action="append", default=[], metavar="NAME=ARGS",
                   help="extra arguments for one section's script, e.g. gemm='--set duration=2' (repeatable)")
    args = p.parse_args(argv)
    PATHS.update(results=os.path.abspath(args.results_dir), output=os.path.abspath(args.output))
    if args.list:
        for name, script, what in SECTIONS:
            state = "file present" if os.path.exists(section_path(name)) else "no file yet"
            print(f"{name:<9} benchmarks/{script:<18} {what} [{state}]")
        return 0
    only, skip = parse_names(args.only, "--only"), parse_names(args.skip, "--skip")
    selected = [n for n in (only or NAMES) if n not in skip]
    extra: Dict[str, List[str]] = {}
    for item in args.section_args:
        name, sep, rest = item.partition("=")
        if not sep or name not in NAMES:
            raise SystemExit(f"run_all.py: --section-args {item!r}: expected NAME=ARGS with NAME one of {NAMES}")
        extra.setdefault(name, []).extend(shlex.split(rest))
    os.makedirs(PATHS["results"], exist_ok=True)
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    statuses: Dict[str, Dict[str, object]] = {}
    for name, script, _what in SECTIONS:
        path = section_path(name)
        have = os.path.exists(path)
        if name in selected and not (args.reuse and have):
            statuses[name] = run_section(name, script, extra.get(name, []), args.timeout)
        elif have:
            statuses[name] = {"status": "reused", "mtime": section_date(path)}
        else:
            statuses[name] = {"status": "not run", "error": "not selected and no section file yet"}
    text = assemble(argv, statuses, started)
    out = PATHS["output"]
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    for name in NAMES:
        st = statuses[name]
        print(f"  {name:<9} {st['status']}" + (f" ({st.get('error')})" if st.get("error") else ""))
    failed = [n for n in selected if statuses[n]["status"] not in ("ran", "reused")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
