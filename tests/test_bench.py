"""nexedge bench: statistics, environment capture, FLOP counting, and real ONNX Runtime runs
of a tiny exported model through the CLI (JSON, decode stage, --compare, errors)."""

import json
import os

import numpy as np
import pytest

from nexedge.bench import env, gemm, report, runner, stats
from nexedge.cli import main

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

CLASSES = ["good", "chipping", "scratch"]


def test_percentile_is_nearest_rank():
    v = list(range(1, 101))  # 1..100
    assert stats.percentile(v, 50) == 50
    assert stats.percentile(v, 99) == 99
    assert stats.percentile(v, 100) == 100
    assert stats.percentile([7.0], 99) == 7.0
    s = stats.summarize([4.0, 1.0, 3.0, 2.0])
    assert (s["min"], s["median"], s["max"], s["n"]) == (1.0, 2.0, 4.0, 4)
    assert s["mean"] == pytest.approx(2.5)
    with pytest.raises(ValueError, match="no samples"):
        stats.summarize([])
    with pytest.raises(ValueError, match="out of range"):
        stats.percentile(v, 101)


def test_env_capture_on_this_machine():
    e = env.capture(threads=2)
    assert e["cores_usable"] >= 1 and e["threads_requested"] == 2
    import onnxruntime

    assert e["libraries"]["onnxruntime"] == onnxruntime.__version__
    assert e["libraries"]["opencv"]
    assert "cores" in env.one_line(e)


def test_env_jetson_probes_on_fake_sysfs(tmp_path):
    root = tmp_path
    (root / "etc").mkdir()
    (root / "etc/nv_tegra_release").write_text(
        "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64\n")
    (root / "proc/device-tree").mkdir(parents=True)
    (root / "proc/device-tree/model").write_text("NVIDIA Jetson Orin Nano Developer Kit\x00")
    (root / "proc/cpuinfo").write_text("processor\t: 0\nmodel name\t: ARMv8 Processor rev 1 (v8l)\n")
    for i, (lo, hi) in enumerate([(1510400, 1510400), (1510400, 1510400)]):
        pol = root / f"sys/devices/system/cpu/cpufreq/policy{i * 4}"
        pol.mkdir(parents=True)
        (pol / "scaling_min_freq").write_text(f"{lo}\n")
        (pol / "scaling_max_freq").write_text(f"{hi}\n")
    gpu = root / "sys/class/devfreq/17000000.ga10b"
    gpu.mkdir(parents=True)
    (gpu / "min_freq").write_text("306000000\n")
    (gpu / "max_freq").write_text("624750000\n")
    info = env.jetson_info(str(root))
    assert info["l4t"] == "35.4.1"
    assert info["model"] == "NVIDIA Jetson Orin Nano Developer Kit"
    assert info["clocks_locked"] == {"cpu": True, "gpu": False}
    assert env.cpu_model(str(root)) == "ARMv8 Processor rev 1 (v8l)"
    (gpu / "min_freq").write_text("624750000\n")
    assert env.clocks_locked(str(root))["gpu"] is True
    assert env.jetson_info(str(tmp_path / "nothing")) is None
    q = "NV Fan Mode:quiet\nNV Power Mode: MAXN\n0\n"
    assert env.parse_nvpmodel(q) == "MAXN (mode 0)"
    assert env.parse_nvpmodel("garbage") is None


def test_flops_of_a_hand_built_graph(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")
    fc = numpy_helper.from_array(np.zeros((8 * 16 * 16, 5), np.float32), "fc")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("MatMul", ["f", "fc"], ["y"]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], [w, fc])
    path = str(tmp_path / "g.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    conv = 2 * (8 * 16 * 16) * (3 * 3 * 3)  # outputs x MACs per output
    mm = 2 * 5 * (8 * 16 * 16)
    r = gemm.model_flops(path, batch=1)
    assert r["flops"] == conv + mm and not r["unresolved"]
    assert gemm.model_flops(path, batch=3)["flops"] == 3 * (conv + mm)
    assert gemm.flops_per_image(path, host_crops=10)["flops_per_image"] == 10 * (conv + mm)


def test_gemm_peak_is_measured():
    g = gemm.measure_peaks(n=128, threads=1, seconds=0.05)
    kinds = [r["kernel"] for r in g["rows"]]
    assert kinds == ["numpy BLAS fp32", "onnxruntime MatMul fp32", "onnxruntime MatMulInteger u8s8"]
    assert g["fp32_peak"] > 0.1 and g["int8_peak"] > 0.1
    u = gemm.utilisation(1e9, 2.0, 4.0)
    assert u == {"achieved_gflops": 2.0, "fraction_of_peak": 0.5}


# -- real runs on ONNX Runtime ------------------------------------------------

def _export(ckpt: str, crops: str, out: str) -> str:
    assert main(["export", ckpt, "--crops", crops, "-o", out, "--parity-images", "2", "--threads", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from nexedge.card import ModelCard
    from nexedge.models import create_model
    from nexedge.models.checkpoint import save_checkpoint

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("bench")
    card = ModelCard.new(CLASSES, resize=(40, 40), crop=(32, 32), crop_mode="ten", color="gray")
    torch.manual_seed(0)
    ckpt = save_checkpoint(str(d / "m.pt"), create_model("tiny", 3, width=8), "tiny", CLASSES, "good",
                           arch_kwargs={"width": 8}, card=card)
    return {
        "dir": d,
        "pt": ckpt,
        "host": _export(ckpt, "host", str(d / "m.host.onnx")),
        "ten": _export(ckpt, "ten", str(d / "m.ten.onnx")),
    }


def _bench(capsys, *argv):
    rc = main(["bench", *argv])
    out = capsys.readouterr().out
    assert rc == 0, out
    return out


def test_bench_onnx_json_and_table(models, capsys, tmp_path):
    out_json = str(tmp_path / "host.json")
    text = _bench(capsys, models["host"], "--batch", "1,3", "--iterations", "6", "--warmup", "1",
                  "--threads", "1", "--crops", "center,ten", "--json", out_json)
    doc = report.load_json(out_json)
    assert [(r["crops"], r["batch"], r["iterations"], r["images"]) for r in doc["results"]] == [
        ("center", 1, 6, 6), ("center", 3, 6, 18), ("ten", 1, 6, 6), ("ten", 3, 6, 18)]
    for r in doc["results"]:
        lat = r["latency_ms"]
        assert {"preprocess", "inference", "postprocess", "total", "e2e"} <= set(lat)
        e = lat["e2e"]
        assert 0 < e["min"] <= e["median"] <= e["p90"] <= e["p95"] <= e["p99"] <= e["max"]
        assert e["n"] == 6
        # throughput is images over the summed iteration latency
        assert r["images_per_s"] == pytest.approx(r["batch"] * 1000.0 / e["mean"], rel=1e-6)
        assert lat["inference"]["mean"] <= e["mean"]
        assert r["backend"] == "onnxruntime" and r["precision"] == "fp32" and r["crops_where"] == "host"
    assert doc["env"]["threads_requested"] == 1 and doc["model"]["sha256"]
    assert "--crops center,ten" in doc["command"]
    assert "img/s" in text and "inference" in text and "p99 ms" in text


def test_bench_in_graph_from_image_files_with_gemm(models, capsys, tmp_path):
    import cv2

    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 256, (50, 47), dtype=np.uint8))
    cv2.imwrite(str(folder / "5.jpg"), rng.integers(0, 256, (61, 64, 3), dtype=np.uint8))
    out_json = str(tmp_path / "ten.json")
    text = _bench(capsys, models["ten"], "--batch", "2", "--iterations", "4", "--warmup", "0",
                  "--threads", "1", "--images", str(folder), "--gemm", "--gemm-size", "64", "--gemm-seconds", "0.05",
                  "--json", out_json)
    doc = report.load_json(out_json)
    r = doc["results"][0]
    assert r["input"] == "files" and r["crops_where"] == "graph"
    assert r["latency_ms"]["decode"]["n"] == 4 and r["latency_ms"]["resize"]["n"] == 4
    host_flops = gemm.model_flops(models["host"], batch=1)["flops"]
    assert r["flops_per_image"] == pytest.approx(10 * host_flops)  # in-graph TenCrop = ten crops of work
    assert r["utilisation"]["achieved_gflops"] == pytest.approx(r["flops_per_image"] * r["images_per_s"] / 1e9)
    assert "GFLOP/s" in text and "decode" in text


def test_compare_two_result_files(models, capsys, tmp_path):
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    _bench(capsys, models["host"], "--batch", "1", "--iterations", "3", "--threads", "1", "--json", a)
    _bench(capsys, models["ten"], "--batch", "1", "--iterations", "3", "--threads", "1", "--json", b)
    text = _bench(capsys, "--compare", a, b)
    da, db = report.load_json(a), report.load_json(b)
    want = db["results"][0]["images_per_s"] / da["results"][0]["images_per_s"]
    assert "ten@host vs ten@graph" in text
    assert f"{want:.2f}" in text


def test_bench_torch_checkpoint_shares_reporting(models, capsys, tmp_path):
    out_json = str(tmp_path / "pt.json")
    _bench(capsys, models["pt"], "--batch", "2", "--iterations", "3", "--threads", "1", "--json", out_json)
    r = report.load_json(out_json)["results"][0]
    assert r["backend"] == "torch" and {"h2d", "inference", "d2h"} <= set(r["latency_ms"])


@pytest.mark.parametrize("argv, message", [
    (["--precision", "int8"], "fp32 artifact"),
    (["--backend", "tensorrt"], "build-engine"),
    (["--batch", "1,x"], "comma-separated"),
    (["--crops", "center"], "in the graph"),
    (["--batch", "100"], "maximum batch"),
])
def test_bench_errors_name_the_bad_value(models, capsys, argv, message):
    rc = main(["bench", models["ten"], "--iterations", "1", *argv])
    assert rc == 1
    assert message in capsys.readouterr().err


def test_compare_rejects_non_results(tmp_path, capsys):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"hello": 1}))
    assert main(["bench", "--compare", str(p), str(p)]) == 1
    assert "not a nexedge bench result" in capsys.readouterr().err
    assert main(["bench", "--compare", str(p), os.path.join(str(tmp_path), "missing.json")]) == 1


def test_stage_order_puts_known_stages_first():
    assert runner.stage_order(["postprocess", "zeta", "decode", "inference", "e2e"]) == [
        "decode", "inference", "postprocess", "e2e", "zeta"]


def test_run_all_only_gemm_reuses_existing_sections(models, tmp_path):
    """benchmarks/run_all.py --only gemm: the GEMM section is measured now (on the tiny model),
    a pre-existing section file is reused verbatim, missing ones are named, RESULTS.md is rewritten."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = tmp_path / "results"
    results.mkdir()
    (results / "backends.md").write_text("## backends\n\nmeasured earlier: 42 img/s\n")
    (results / "backends.history.md").write_text("### hand-kept\n\nearlier still: 7 img/s\n")
    out = tmp_path / "RESULTS.md"
    cmd = [sys.executable, os.path.join(root, "benchmarks", "run_all.py"), "--only", "gemm",
           "--results-dir", str(results), "--output", str(out), "--section-args",
           f"gemm=--model {models['host']} --set batch=1 --set duration=0.2 --set gemm_size=64 --set gemm_seconds=0.05 "
           "--threads 1"]
    p = subprocess.run(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    text = out.read_text()
    assert p.returncode == 0, p.stdout.decode()[-2000:]
    assert "measured earlier: 42 img/s" in text and "reused section file" in text
    assert text.index("measured earlier: 42 img/s") < text.index("earlier still: 7 img/s") < text.index("## gemm")
    assert "## gemm" in text and "of GEMM peak" in text and "m.host.onnx" in text
    assert "--only gemm" in text and "| CPU |" in text
    assert "**not run**" in text  # daemon/shift/trainer: no file, not selected
    assert (results / "gemm.md").exists() and (results / "gemm.log").exists()
    # a selected section whose script fails makes run_all fail loudly (and still writes the file)
    bad = [c if not c.startswith("gemm=") else "gemm=--model /nonexistent.onnx" for c in cmd]
    p = subprocess.run(bad, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert p.returncode == 1
    assert "**failed**" in out.read_text()


def test_engine_path_shares_reporting_with_fake_tensorrt_backend(models, capsys, tmp_path, monkeypatch):
    """No TensorRT here: a fake engine backend (numpy logits, h2d/inference/d2h timings) checks that
    .engine artifacts go through the same runner and report, and that engine-only rules hold."""
    import nexedge.runtime as rt
    from nexedge.card import load_card
    from nexedge.runtime.base import Backend

    engine = str(tmp_path / "m.int8.engine")
    with open(engine, "wb") as f:
        f.write(b"not a real engine")
    card = load_card(models["host"]).derive("engine", precision="int8")
    card.data["graph"]["max_batch"] = 4
    card.save_for(engine, parent=models["host"])

    class FakeTensorRT(Backend):
        name = "tensorrt"

        def __init__(self, path, **kw):
            assert kw == {}, kw  # no threads/crop_mode/max_batch for engines
            super().__init__(load_card(path))

        def _run_host(self, x, timings):
            timings.update(h2d=1e-4, inference=2e-4, d2h=1e-4)
            return np.zeros((x.shape[0], 3), np.float32)

    monkeypatch.setattr(rt, "open_backend", lambda path, **kw: FakeTensorRT(path, **kw))
    out_json = str(tmp_path / "engine.json")
    text = _bench(capsys, engine, "--backend", "tensorrt", "--precision", "int8", "--batch", "1,4",
                  "--iterations", "3", "--json", out_json)
    doc = report.load_json(out_json)
    assert [(r["backend"], r["precision"], r["batch"]) for r in doc["results"]] == [
        ("tensorrt", "int8", 1), ("tensorrt", "int8", 4)]
    assert {"h2d", "inference", "d2h"} <= set(doc["results"][0]["latency_ms"])
    assert doc["results"][0]["latency_ms"]["h2d"]["median"] == pytest.approx(0.1)
    assert "h2d" in text and "d2h" in text
    assert main(["bench", engine, "--threads", "2", "--iterations", "1"]) == 1
    assert "does not apply to the tensorrt backend: a TensorRT engine's crops" in capsys.readouterr().err
    assert main(["bench", engine, "--batch", "8", "--iterations", "1"]) == 1
    assert "maximum batch 4" in capsys.readouterr().err


def _bench_module(name):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_line_tail_pass_share_at_tpr_and_lowest_defects():
    tail = _bench_module("bench_line_tail")
    # 10 good scored 0.0..0.9, 200 defects: one hides at 0.45, the rest score 0.95
    rows = [{"true_label": "good", "path": f"g{i}.png"} for i in range(10)]
    rows += [{"true_label": "scratch", "path": "weak.png", "defect_mode": None, "severity": 0.1}]
    rows += [{"true_label": "chipping", "path": f"c{i}.png", "severity": 0.9} for i in range(199)]
    s = np.r_[np.arange(10) / 10.0, 0.45, np.full(199, 0.95)]
    res = tail.summarize(rows, s, lowest=2)
    assert res["n_good"] == 10 and res["n_defect"] == 200
    # TPR 99.1 % tolerates the one weak defect (1/200 = 0.5 %): the threshold rises to 0.95, all good PASS
    assert res["pass_at_tpr"]["99.1"] == pytest.approx(1.0)
    # TPR 100 % must catch it: only the goods below 0.45 PASS
    assert res["pass_at_tpr"]["100"] == pytest.approx(0.5)
    assert res["per_class"]["chipping"]["auc"] == pytest.approx(1.0)
    assert res["per_class"]["scratch"]["auc"] == pytest.approx(0.5)
    assert [d["path"] for d in res["lowest"]] == ["weak.png", "c0.png"]


def test_line_tail_auc_per_defect_mode():
    tail = _bench_module("bench_line_tail")
    rows = [{"true_label": "good", "path": f"g{i}.png"} for i in range(10)]
    rows += [{"true_label": "lead_defect", "defect_mode": "bent", "path": f"b{i}.png"} for i in range(3)]
    rows += [{"true_label": "lead_defect", "defect_mode": "shifted", "path": f"s{i}.png"} for i in range(2)]
    rows += [{"true_label": "chipping", "defect_mode": None, "path": "c.png"}]
    s = np.r_[np.arange(10) / 10.0, [0.95] * 3, 0.05, 0.55, 0.99]
    modes = tail.per_mode_auc(rows, s)
    assert set(modes) == {"lead_defect bent", "lead_defect shifted"}
    assert modes["lead_defect bent"] == {"n": 3, "auc": pytest.approx(1.0)}
    assert modes["lead_defect shifted"]["auc"] == pytest.approx((0.1 + 0.6) / 2)


def test_line_tail_split_simulation_bounds_zero_escapes_for_any_model():
    tail = _bench_module("bench_line_tail")
    # a perfect ranking (every defect above every good): every good PASSes, yet a test defect
    # escapes whenever the lowest defect lands in the test split, 30 times in 40
    rows = [{"true_label": "good"}] * 50 + [{"true_label": "scratch"}] * 60
    s = np.r_[np.linspace(0, 0.4, 50), np.linspace(0.6, 1.0, 60)]
    sim = tail.simulate_split(rows, s, 10, 30, 20, draws=3000)
    assert sim["bound"] == pytest.approx(0.25)
    assert sim["p_zero_escapes"] == pytest.approx(0.25, abs=0.03)
    assert sim["pass_median"] == 1.0 and sim["p_half_pass"] == 1.0
    assert sim["p_both"] == pytest.approx(sim["p_zero_escapes"])
    # defects scored like the goods: the threshold falls among them, about half PASS at best
    s2 = np.r_[np.linspace(0, 1, 50), np.linspace(0.005, 0.995, 60)]
    sim2 = tail.simulate_split(rows, s2, 10, 30, 20, draws=500)
    assert sim2["pass_median"] < 0.2
    with pytest.raises(ValueError, match="needs 95 defect"):
        tail.simulate_split(rows, s, 60, 35, 20)
    with pytest.raises(Exception, match="VAL_DEFECTS,TEST_DEFECTS,TEST_GOOD"):
        tail.parse_split("53,62")


def test_run_all_dates_an_unstamped_section_by_its_commit_not_its_checkout(tmp_path):
    import subprocess

    run_all = _bench_module("run_all")
    (tmp_path / "stamped.md").write_text("## x\n\n- date: 2026-11-30 10:00 UTC\n")
    assert run_all.section_date(str(tmp_path / "stamped.md")) == "2026-11-30 10:00 UTC"
    sec = tmp_path / "plain.md"
    sec.write_text("## a section that names no time\n")
    assert run_all.section_date(str(sec)).endswith("(file time)")  # not in a repository
    env = dict(os.environ, GIT_AUTHOR_DATE="2026-11-29T08:30:00Z", GIT_COMMITTER_DATE="2026-11-29T08:30:00Z",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@x", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@x")
    for cmd in (["git", "init", "-q"], ["git", "add", "plain.md"], ["git", "commit", "-qm", "s"]):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True)
    assert run_all.section_date(str(sec)) == "2026-11-29 08:30 UTC (committed)"
    sec.write_text("## edited since\n")  # a changed file's commit time says nothing about it
    assert run_all.section_date(str(sec)).endswith("(file time)")


def test_realism_transfer_over_seeds_mean_and_ensemble():
    real = _bench_module("bench_realism")

    def run(scores):  # 2 good, 2 defective references
        labels = ["good", "good", "chipping", "scratch"]
        rows = [{"file": f"r{i}.png", "label": lab, "score": s} for i, (lab, s) in enumerate(zip(labels, scores))]
        from nexedge import metrics

        return {"rows": rows, "auc": metrics.roc_auc(np.array([0, 0, 1, 1]), np.array(scores))}

    # each seed misorders one pair, a different one: the ensemble of log-odds orders all four
    a = run([0.30, 0.80, 0.70, 0.95])
    b = run([0.75, 0.20, 0.90, 0.60])
    res = real.over_seeds([a, b])
    assert res["aucs"] == [0.75, 0.75] and res["auc_mean"] == pytest.approx(0.75) and res["met"] == 0
    assert res["auc_ensemble"] == pytest.approx(1.0)
    assert res["good_mean"] == pytest.approx(np.mean([0.30, 0.80, 0.75, 0.20]))
    # rows in another order per seed are matched by file, not by position
    b["rows"] = b["rows"][::-1]
    assert real.over_seeds([a, b])["auc_ensemble"] == pytest.approx(1.0)
    assert real._with_seed(real.SYNTH_ARGS, 7)[real.SYNTH_ARGS.index("{seed}")] == "7"
