"""Run the demo's stages in order, then print the recap of their results and the stage timings."""

import os
import time
from typing import Any, Callable, Dict, List, Tuple

from nexedge.demo.context import Demo


def stages() -> List[Tuple[str, str, Callable[[Demo], None]]]:
    from nexedge.demo import stages as demo_stages

    return [
        ("data", "generate a synthetic data set", demo_stages.stage_data),
        ("train", "train a small model on the CPU", demo_stages.stage_train),
        ("eval", "evaluation table (test split)", demo_stages.stage_eval),
        ("export", "export to ONNX, crops chosen on val (--crops auto)", demo_stages.stage_export),
        ("int8", "INT8 calibration (ONNX Runtime U8S8)", demo_stages.stage_calibrate),
        ("daemon", "start nexedge-daemon", demo_stages.stage_daemon),
        ("stream", "stream the test images from simulated cameras", demo_stages.stage_stream),
        ("pull", "pull the uncertain samples", demo_stages.stage_pull),
    ]


def run_stages(demo: Demo, plan: List[Tuple[str, str, Callable[[Demo], None]]],
               records: List[Dict[str, Any]]) -> None:
    """Run stages in order, appending one record per stage attempted; the first failure propagates."""
    n = len(plan)
    try:
        for i, (name, title, fn) in enumerate(plan, 1):
            demo.say(f"\n=== [{i}/{n}] {name}: {title} ===")
            t0, c0 = time.perf_counter(), cpu_seconds()
            rec: Dict[str, Any] = {"stage": name, "title": title}
            records.append(rec)
            try:
                fn(demo)
                rec["status"] = "ok"
            except BaseException as e:
                rec["status"] = "FAILED"
                rec["error"] = f"{type(e).__name__}: {e}"
                raise
            finally:
                rec["seconds"] = round(time.perf_counter() - t0, 2)
                rec["cpu_seconds"] = round(cpu_seconds() - c0, 2)
                demo.say(f"--- {name}: {rec['status']} in {rec['seconds']:.1f} s")
    finally:
        for fn in reversed(demo.cleanups):
            try:
                fn()
            except Exception as e:  # a cleanup error must not hide the stage error
                demo.say(f"cleanup error: {e}")


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100.0 * float(x):.1f}%"


def print_recap(demo: Demo) -> None:
    """The numbers a reader wants from the run, from the stages that finished."""
    r = demo.results
    lines = []
    if "data" in r:
        c = r["data"]["counts"]
        lines.append("data: {} images (train {}, val {}, test {}) in {}".format(
            sum(c.values()), c.get("train"), c.get("val"), c.get("test"), r["data"]["root"]))
    if "train" in r:
        lines.append("model: {} -> {} (val AUC {})".format(demo.settings["arch"], r["train"]["best"],
                                                        _pct(r["train"].get("best_val_auc"))))
    if "eval" in r:
        for crop, e in r["eval"]["crops"].items():
            lines.append("test {:>6}: AUC {}  FPR at TPR>=99.1% {}  at 100% {}".format(
                crop, _pct(e["auc"]), _pct(e["fpr_at_tpr"].get("99.1")), _pct(e["fpr_at_tpr"].get("100"))))
    if "int8" in r:
        lines.append(f"INT8 model: {r['int8']['onnx']}")
        m = r["int8"].get("metrics")
        if m:
            ci = m.get("auc_delta_ci95_points")
            flips = r["int8"].get("decision_flips") or {}
            lines.append("INT8 vs FP32 on {} ({} images): AUC {} vs {} (delta {}), max score diff {:.4f}, "
                         "decisions that differ at the deployed point: {} of good, {} of defects; size {:.1f} MB vs "
                         "{:.1f} MB".format(
                             m.get("split", "?"), m["n_images"], _pct(m["auc_int8"]), _pct(m["auc_fp32"]),
                             "-" if m.get("auc_delta_points") is None else
                             "{:+.2f} points{}".format(m["auc_delta_points"], "" if not ci else
                                                       ", 95 % CI {:+.2f} to {:+.2f}".format(*ci)),
                             m["max_abs_score_diff"], _pct(flips.get("good")), _pct(flips.get("defect")),
                             r["int8"]["bytes"] / 1e6, r["int8"]["fp32_bytes"] / 1e6))
    if "stream" in r:
        s = r["stream"]
        d = s["decisions"]
        lat = s.get("daemon_latency_ms") or {}
        lines.append("line: {} frames, PASS {} REJECT {} RECHECK {}, escapes {}, overkill {}, latency p50 {} p95 {} "
                     "p99 {} ms".format(s["frames"], d["PASS"], d["REJECT"], d["RECHECK"], s["escapes"],
                                       s["overkill"], *(f"{lat[k]:.1f}" if lat else "-"
                                                        for k in ("median", "p95", "p99"))))
        good = s["binary"]["good"]
        lines.append("line: good PASSed {}/{}; escapes per class: {}".format(
            good["PASS"], sum(good.values()), ", ".join(
                f"{c} {row['PASS']}" for c, row in sorted(s["per_class"].items()) if c != "good") or "-"))
    if "stream" in r and "daemon" in r:
        lines.append(deployed_claim_line(r["daemon"], r["stream"]))
    if "pull" in r:
        lines.append(f"pulled: {r['pull']['samples']} samples -> {r['pull']['out']}")
    if lines:
        demo.say("\nsummary:")
        for ln in lines:
            demo.say("  " + ln)


def deployed_claim_line(daemon: Dict[str, Any], stream: Dict[str, Any]) -> str:
    """The deployed artifact's claimed TPR and its 95 % lower bound (from its card) beside the TPR and
    FPR the daemon actually delivered on the test images."""
    from nexedge.card import load_card

    try:
        card = load_card(daemon["model"], verify=False)
        target = daemon.get("target_tpr") or 1.0  # line.py configures the daemon at TPR 100 %
        op = card.operating_point(target)
    except (ValueError, OSError) as e:
        return f"deployed {daemon.get('model')}: no operating point to compare ({e})"
    b = stream["binary"]
    n_def, n_good = sum(b["defect"].values()), sum(b["good"].values())
    tpr = b["defect"]["REJECT"] / n_def if n_def else None
    fpr = b["good"]["REJECT"] / n_good if n_good else None
    src = card.ops_source
    return ("deployed {}: claimed TPR {} (95% lower bound {}, {} {} defects, {}) | on test: TPR {} FPR {} "
            "({} defect, {} good; RECHECK counts as not rejected)".format(
                os.path.basename(daemon["model"]), _pct(op.get("tpr")), _pct(op.get("tpr_lower95")),
                src.get("split", "?"), op.get("n_defects"), src.get("status", "provenance unknown"),
                _pct(tpr), _pct(fpr), n_def, n_good))


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (synth workers, the daemon once stopped)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def print_timings(demo: Demo, records: List[Dict[str, Any]], wall: float, cpu: float) -> None:
    demo.say("\nstage timings (wall, and CPU seconds used; CPU > wall means several cores busy):")
    for r in records:
        demo.say("  {:<8} {:>7.1f} s  cpu {:>7.1f} s  {}".format(r["stage"], r["seconds"], r.get("cpu_seconds", 0.0),
                                                               r["status"]))
    demo.say("  {:<8} {:>7.1f} s  cpu {:>7.1f} s  (wall {:.1f} min; load average at the end {})".format(
        "total", wall, cpu, wall / 60, " ".join(f"{x:.1f}" for x in os.getloadavg())))
