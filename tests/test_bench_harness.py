"""The bench harness's schema and the no-GPU message (benchmarks themselves run on the GPU lane)."""
import time
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from bench import harness


@pytest.fixture(autouse=True)
def _warmup_budget_from_the_test():
    """bench.bench_warmup counts its budget (PGOLF_WARMUP_BUDGET_S) from its import, the bench process's start; this
    file imports it at collection, so a test that runs minutes later (a worker busy with other files first) would find
    the budget spent and run no child. Each test here starts it afresh."""
    from bench import bench_warmup

    saved = bench_warmup._T0
    bench_warmup._T0 = time.perf_counter()
    yield
    bench_warmup._T0 = saved


def test_make_row_schema_and_speedup():
    r = harness.make_row("int6", "N512 K512 M16", 0.5, "cublas_bf16", 1.0, tflops=1.23456)
    for k in ("kernel", "case", "ours_ms", "baseline", "baseline_ms", "speedup"):
        assert k in r
    assert r["speedup"] == 2.0
    assert r["tflops"] == 1.2346


def test_save_results_writes_json_and_md(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "gpu_slug", lambda: "testgpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(harness, "env_info", lambda: {"device": "Test GPU", "torch": "x", "triton": "y", "date": "d"})
    rows = [harness.make_row("k", "c", 1.0, "b", 3.0)]
    path = harness.save_results("k", rows, results_dir=str(tmp_path))
    d = json.load(open(path))
    assert path.endswith("k-testgpu.json")
    assert {"device", "torch", "triton", "date", "rows"} <= set(d)
    assert d["rows"][0]["speedup"] == 3.0
    md = (tmp_path / "k-testgpu.md").read_text()
    assert "| k | c |" in md


def test_bench_without_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the no-GPU message is checked on the CPU lane")
    out = subprocess.run([sys.executable, "-m", "bench"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "no CUDA GPU" in out.stdout


def test_report_renders(tmp_path):
    import json

    from bench import report

    rows = [{"kernel": "k", "case": "c1", "ours_ms": 1.0, "baseline": "b", "baseline_ms": 2.0, "speedup": 2.0},
            {"kernel": "k", "case": "c2", "ours_ms": 4.0, "baseline": "b", "baseline_ms": 2.0, "speedup": 0.5}]
    (tmp_path / "k-h200.json").write_text(json.dumps({"device": "GPU X", "torch": "t", "triton": "tr", "date": "d",
                                                      "notes": "note text", "rows": rows}))
    (tmp_path / "profile-h200.json").write_text(json.dumps({"device": "GPU X"}))
    md = report.render(str(tmp_path))
    assert "## k-h200" in md and "note text" in md and "| c1 |" in md and "| c2 |" in md
    assert "speedup min 0.50 / median 2.00 / max 2.00" in md
    assert "bench/results/profile-h200.md" in md  # files without rows are linked, not tabulated
    assert "(no GPU results yet)" in report.render(str(tmp_path / "empty"))


def test_results_files_are_named_by_kernel_and_gpu():
    """bench/results holds <kernel>-<gpu>.json|md only (a newer measurement replaces the file)."""
    import glob
    import os
    import re

    from bench.harness import RESULTS_DIR

    names = [os.path.basename(p) for p in glob.glob(os.path.join(RESULTS_DIR, "*")) if os.path.isfile(p)]
    assert names
    bad = [n for n in names if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*-(h100|h200|cpu)\.(json|md)", n)
           or re.search(r"-(run|session|design)\d", n)]
    assert not bad, bad


def test_time_all_keeps_going_past_a_failing_contestant(capsys):
    from bench.harness import time_all

    def boom():
        raise RuntimeError("no kernel")

    t = time_all({"ours": lambda: None, "baseline": boom}, timer=lambda f: (f(), 1.5)[1], label="case")
    assert t["ours"] == 1.5 and t["baseline"] != t["baseline"]  # NaN
    assert "case baseline: RuntimeError: no kernel" in capsys.readouterr().out


def test_records_training_log_slopes():
    """bench_records' ms/step from both training-log formats: train_time in ms (2026-03-17/23), and the
    2026-04-29 lines whose time comes from the cumulative tok/s."""
    from bench.bench_records import slope_ms

    ms = "\n".join(f"step:{s}/50 train_loss:{5 - s / 100:.4f} train_time:{1000 + 80 * s}ms step_avg:1ms"
                   for s in range(1, 51))
    b, noise, n, last, med, worst = slope_ms(ms, 10, 50)
    assert abs(b - 80) < 1e-9 and noise < 1e-9 and n == 41 and last == 4.5 and med == worst == 80
    tokens = 393_216  # elapsed(s) = 0.5 s + 0.25 s per step
    rate = "\n".join(f"{s}/50 train_loss: {5 - s / 100:.4f} train_time: 0.1m tok/s: {round(s * tokens / (0.25 * s + 0.5))}"
                     for s in range(1, 51))
    b, noise, n, last, med, _ = slope_ms(rate, 10, 50, tokens)
    assert abs(b - 250) < 0.01 and n == 41 and last == 4.5 and abs(med - 250) < 0.01
    # one step stalled by 400 ms at step 30 (every later elapsed time lifted), steps logged every 2 from 40 on:
    # the least-squares slope moves, the median increment does not, the largest increment shows the stall
    ms = "\n".join(f"step:{s}/50 train_loss:4.0 train_time:{1000 + 80 * s + (400 if s >= 30 else 0)}ms step_avg:1ms"
                    for s in list(range(1, 40)) + list(range(40, 51, 2)))
    b, noise, n, _, med, worst = slope_ms(ms, 10, 50)
    assert b > 85 and noise > 50 and med == 80 and worst == 480 and n == 36


def test_records_training_verdict_on_the_steady_step():
    """The training row's verdict: patched median steady step against the record's, within the larger per-variant
    run spread; a slower patched step beyond that spread is reported as slower."""
    from bench.bench_records import steady_verdict

    v = steady_verdict([582.5, 582.4], [583.1, 581.7])
    assert v["steady_ms"] == 582.45 and v["baseline_steady_ms"] == 582.4 and v["steady_noise_ms"] == 1.4
    assert v["steady_delta_ms"] == 0.05 and v["not_slower"] is True
    v = steady_verdict([590.0, 591.0], [582.0, 582.5])
    assert v["steady_delta_ms"] == 8.25 and v["not_slower"] is False and abs(v["steady_speedup"] - 582.25 / 590.5) < 1e-12
    assert steady_verdict([100.0], [100.5])["not_slower"] is True and steady_verdict([101.0], [100.0])["not_slower"] is False


def test_warmup_bench_refuses_an_unknown_case_before_any_work(monkeypatch):
    from bench import bench_warmup

    monkeypatch.setenv("PGOLF_WARMUP_CASES", "seeds-ref,seeds-graphs")
    monkeypatch.setattr("bench.bench_eval.build_artifact", lambda *a, **k: pytest.fail("built an artifact first"))
    with pytest.raises(ValueError, match=r"PGOLF_WARMUP_CASES = .*unknown case\(s\) \['seeds-graphs'\]"):
        bench_warmup.run()


@pytest.mark.parametrize("env, match", [({"PGOLF_WARMUP_DOCS": "0"}, r"PGOLF_WARMUP_DOCS = '0': expected"),
                                        ({"PGOLF_WARMUP_DOCS": "2e3"}, r"PGOLF_WARMUP_DOCS = '2e3': expected"),
                                        ({"PGOLF_WARMUP_SHARE": "8/8"}, r"PGOLF_WARMUP_SHARE = '8/8': expected"),
                                        ({"PGOLF_WARMUP_SHARE": "half"}, r"PGOLF_WARMUP_SHARE = 'half': expected")])
def test_warmup_bench_refuses_a_bad_size_before_any_work(monkeypatch, env, match):
    from bench import bench_warmup

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr("bench.bench_eval.build_artifact", lambda *a, **k: pytest.fail("built an artifact first"))
    with pytest.raises(ValueError, match=match):
        bench_warmup.run()


def test_warmup_bench_size_defaults_and_the_official_set(monkeypatch):
    from bench.bench_warmup import _size
    from train.synthetic import OFFICIAL_TOKENS

    monkeypatch.delenv("PGOLF_WARMUP_DOCS", raising=False)
    monkeypatch.delenv("PGOLF_WARMUP_SHARE", raising=False)
    assert _size() == (2000, 2000 * 1240, "0/8")
    monkeypatch.setenv("PGOLF_WARMUP_DOCS", "50000")
    monkeypatch.setenv("PGOLF_WARMUP_SHARE", "all")
    assert _size() == (50000, OFFICIAL_TOKENS, None)


def test_step_timer_times_every_call_in_place_and_undoes():
    """bench_records.StepTimer wraps cls.step for every instance, keeps what step returns, reports the median of
    the last calls and restores the class (on CPU it times with perf_counter)."""
    from bench.bench_records import StepTimer

    class Opt:
        calls = 0

        def __init__(self):
            self.n = 0

        def step(self, closure=None):
            self.n += 1
            Opt.calls += 1
            time.sleep(0.05 if Opt.calls <= 2 else 0.0)  # the first calls of the run are the slow ones (compile)
            return self.n

    orig = Opt.__dict__["step"]
    timer = StepTimer(Opt)
    a, b = Opt(), Opt()
    assert [a.step(), a.step(), a.step(), b.step(), b.step()] == [1, 2, 3, 1, 2]
    res = timer.ms(2)
    # 50 ms sleeps against a 25 ms bound: a scheduler stall on the 2 shared CI cores does not reach it
    assert res["calls"] == 5 and res["ms"] < 25.0 and timer.ms(5)["max_ms"] >= 50.0
    with pytest.raises(ValueError, match="last = 0"):
        timer.ms(0)
    with pytest.raises(TypeError, match="StepTimer: cls must be a class with a step"):
        StepTimer(Opt())
    with pytest.raises(TypeError, match="StepTimer: cls must be a class with a step"):
        StepTimer(int)
    timer.undo()
    assert Opt.__dict__["step"] is orig and Opt().step() == 1 and len(timer.calls) == 5


def test_records_ttt_log_and_refusals(monkeypatch, tmp_path):
    """bench_records' TTT rows: the 2026-04-29 log lines parsed, a log without the eval line refused, the val
    shard holds PGOLF_RECORDS_TTT_DOCS documents, an unknown variant refused before any shard is written."""
    from bench import bench_records as br
    from train.data import BOS_ID, read_shard

    log = ("ttt_lora:compile warmup done (97.3s)\n\nbeginning TTT eval timer\n"
           "quantized_ttt_phased val_loss:2.32149556 val_bpb:1.06083288 eval_time:525512ms\n")
    assert br.ttt_times(log) == dict(val_loss=2.32149556, val_bpb=1.06083288, eval_s=525.512, warmup_s=97.3)
    with pytest.raises(RuntimeError, match="quantized_ttt_phased"):
        br.ttt_times("ttt_lora:compile warmup done (97.3s)\n")
    monkeypatch.setattr(br, "TTT_DOCS", 40)
    br._write_ttt_shards(str(tmp_path / "d"), 8192)
    val = read_shard(str(tmp_path / "d" / "fineweb_val_000000.bin"))
    assert int((val == BOS_ID).sum()) == 40 and int(val.int().max()) < 8192
    monkeypatch.setenv("PGOLF_RECORDS_TTT_VARIANTS", "record,fast")
    monkeypatch.setattr(br, "_write_ttt_shards", lambda *a: pytest.fail("wrote shards before refusing"))
    with pytest.raises(ValueError, match="unknown \\['fast'\\]"):
        br._ttt_rows([], 100.0, time.time())


def test_warmup_bench_cachefile_case_hands_only_the_file_to_the_second_process(monkeypatch):
    """seeds-ref-cachefile: both processes name the same --compile-cache file; the second one runs on cache folders
    of its own (empty), where every other case reuses the first process's folders."""
    from bench import bench_warmup

    calls = []

    def child(args, caches, timeout, profile=None):
        calls.append((args, caches))
        return {"to_scoring_s": 1.0, "val_bpb": 1.0, "docs": 1}

    monkeypatch.setenv("PGOLF_WARMUP_CASES", "seeds-ref-cachefile,seeds-ref-default")
    monkeypatch.setattr("bench.bench_eval.build_artifact", lambda *a, **k: None)
    monkeypatch.setattr("train.synthetic.write_synthetic_val", lambda d, **k: "val.bin")
    monkeypatch.setattr(bench_warmup, "_tokenizer", lambda: "tok.model")
    monkeypatch.setattr(bench_warmup, "_child", child)
    rows = bench_warmup.run()
    (a0, c0), (a1, c1), (a2, c2), (a3, c3) = calls
    f0, f1 = a0[a0.index("--compile-cache") + 1], a1[a1.index("--compile-cache") + 1]
    assert f0 == f1 and f0.endswith("seeds-ref.compile-cache") and "{work}" not in f0
    assert c0 != c1 and c2 == c3 and "--compile-cache" not in a2
    assert "--compile-cache" in rows[0]["case"] and len(rows) == 2


@pytest.mark.parametrize("name", sorted(__import__("bench.bench_warmup", fromlist=["CASES"]).CASES))
def test_every_warmup_case_is_a_valid_eval_command_line(name):
    """Each warm-up case's arguments parse with the eval driver's own parser and set what the case says (a typo in
    a case would otherwise surface only on the GPU, after the artifact build)."""
    from bench.bench_warmup import CASES
    from train import eval as ev

    recipe, reference, extra = CASES[name]
    args = ev._parse(["--artifact", "a", "--val", "v", "--tokenizer", "t", "--recipe", recipe, *extra]
                     + (["--reference"] if reference else []))
    assert args.recipe == recipe and args.reference == reference
    if "--schedule" in extra:
        assert args.schedule == extra[extra.index("--schedule") + 1]
    from bench.bench_warmup import case_label

    if "--graph-window-step" in extra:  # the row's case names the window step it ran
        step = extra[extra.index("--graph-window-step") + 1]
        assert args.graph_window_step == int(step) and f"--graph-window-step {step}" in case_label(*CASES[name])
    if "--graph-capture" in extra:
        assert args.ttt_cfg.graph_capture == "first-use" and "--graph-capture first-use" in case_label(*CASES[name])
    if "--parallel-compile" in extra:
        which = extra[extra.index("--parallel-compile") + 1]
        assert args.parallel_compile == which and f"--parallel-compile {which}" in case_label(*CASES[name])
    if "--fused-optimizer" in extra:
        assert args.ttt_cfg.fused_optimizer is True and "--fused-optimizer on" in case_label(*CASES[name])
    if ("--cuda-graphs", "on") in set(zip(extra, extra[1:])):
        assert args.cuda_graphs == "on" and "CUDA graphs" in case_label(*CASES[name])


def test_records_ttt_children_run_on_fresh_caches_and_hand_over_the_cache_file(monkeypatch, tmp_path):
    """bench_records' TTT rows: every child gets empty cache folders of its own; a repeated patched-cachefile child
    first writes the compile-cache file (at its exit), then loads it, and the row lists both runs."""
    from bench import bench_records as br

    calls = []

    def spawn(args, timeout, caches="", **env):
        calls.append((args, caches, env))
        if args[1] == "ttt-artifact":
            return {"quant_bytes": 1, "serialize_s": 0.1}, ""
        if args[args.index("--variant") + 1] == "patched-cachefile" and not os.path.exists(env["PGOLF_RECORDS_COMPILE_CACHE"]):
            with open(env["PGOLF_RECORDS_COMPILE_CACHE"], "wb") as f:
                f.write(b"x" * 7)
        return {"wall_s": 1.0, "peak_mb": 1.0, "patch": "p"}, "log"

    monkeypatch.setenv("PGOLF_RECORDS_TTT_VARIANTS", "record,patched-cachefile,patched-cachefile")
    monkeypatch.setattr(br, "_spawn", spawn)
    monkeypatch.setattr(br, "_write_ttt_shards", lambda d, v, docs=0: None)
    monkeypatch.setattr(br, "ttt_times", lambda log: {"eval_s": 2.0, "warmup_s": 3.0, "val_bpb": 1.5, "val_loss": 1.0})
    monkeypatch.setattr(br, "_save", lambda rows: None)
    rows = []
    br._ttt_rows(rows, budget=1e6, t0=__import__("time").time())
    ttt = [c for c in calls if c[0][1] == "ttt"]
    assert len(ttt) == 3 and len({c[1] for c in ttt}) == 3 and all(c[1] for c in ttt)
    assert [r["compile_cache"] for r in rows[0]["cache_runs"]] == ["wrote 7 bytes", "loaded 7 bytes"]
    # PGOLF_RECORDS_TTT_ARTIFACT: the first bench writes the artifact there, a later one (another device call)
    # reuses it without the artifact child; a different document count writes it again
    monkeypatch.setenv("PGOLF_RECORDS_TTT_VARIANTS", "patched")
    monkeypatch.setenv("PGOLF_RECORDS_TTT_ARTIFACT", str(tmp_path / "art"))
    for docs, spawned in ((br.TTT_DOCS, 1), (br.TTT_DOCS, 0), (br.TTT_DOCS + 1, 1)):
        monkeypatch.setattr(br, "TTT_DOCS", docs)
        calls.clear()
        br._ttt_rows([], budget=1e6, t0=__import__("time").time())
        assert sum(c[0][1] == "ttt-artifact" for c in calls) == spawned
        assert [c[0][c[0].index("--artifact") + 1] for c in calls if c[0][1] == "ttt"] == [
            str(tmp_path / "art" / "art-2026-04-29")]
    monkeypatch.setenv("PGOLF_RECORDS_TTT_VARIANTS", "record,cached")
    with pytest.raises(ValueError, match="PGOLF_RECORDS_TTT_VARIANTS: unknown \\['cached'\\]"):
        br._ttt_rows([], budget=1e6, t0=0.0)


def test_records_ttt_cold_docs_runs_each_variant_cold_then_warm_on_its_caches(monkeypatch):
    """PGOLF_RECORDS_TTT_COLD_DOCS: per variant, a cold child on the small val shard, then the share's child on the
    same cache folders (each variant its own); the row holds both warm-ups."""
    from bench import bench_records as br

    calls, shards = [], []

    def spawn(args, timeout, caches="", **env):
        calls.append((args, caches))
        if args[1] == "ttt-artifact":
            return {"quant_bytes": 1, "serialize_s": 0.1}, ""
        cold = "ttt-cold-" in args[args.index("--data") + 1]
        return {"wall_s": 9.0 if cold else 5.0, "peak_mb": 1.0, "patch": "p"}, "cold" if cold else "warm"

    monkeypatch.setenv("PGOLF_RECORDS_TTT_VARIANTS", "record,patched")
    monkeypatch.setattr(br, "TTT_COLD_DOCS", 16)
    monkeypatch.setattr(br, "_spawn", spawn)
    monkeypatch.setattr(br, "_write_ttt_shards", lambda d, v, docs=0: shards.append((os.path.basename(d), docs)))
    monkeypatch.setattr(br, "ttt_times", lambda log: {"eval_s": 2.0, "warmup_s": 300.0 if log == "cold" else 30.0,
                                                      "val_bpb": 1.5, "val_loss": 1.0})
    monkeypatch.setattr(br, "_save", lambda rows: None)
    rows = []
    br._ttt_rows(rows, budget=1e6, t0=__import__("time").time())
    assert shards == [("ttt-2026-04-29", 0), ("ttt-cold-2026-04-29", 16)]
    ttt = [(a[a.index("--variant") + 1], "cold" in a[a.index("--data") + 1], c) for a, c in calls if a[1] == "ttt"]
    assert [(v, cold) for v, cold, _ in ttt] == [("record", True), ("record", False), ("patched", True), ("patched", False)]
    assert ttt[0][2] == ttt[1][2] != ttt[2][2] == ttt[3][2]  # a variant's two children share its caches
    r = rows[0]
    assert (r["cold_warmup_s"], r["baseline_cold_warmup_s"], r["warmup_s"], r["cold_docs"]) == (300.0, 300.0, 30.0, 16)


def test_records_muon_row_extras():
    from bench.bench_records import _muon_extras

    r = {"patched": {"ms": 1.0, "kernels": [["k", 1.0, 1]], "graph_ms": 0.9},
         "record": {"ms": 2.0, "graph_error": "RuntimeError: capture"},
         "torch_pack": {"ms": 0.8, "kernels": [["p", 0.5, 1]]}}
    assert _muon_extras(r) == {"kernels": [["k", 1.0, 1]], "graph_ms": 0.9, "baseline_graph_error": "RuntimeError: capture",
                               "torch_pack_ms": 0.8, "torch_pack_kernels": [["p", 0.5, 1]]}
    assert _muon_extras({"patched": {"ms": 1.0}, "record": {"ms": 2.0}}) == {}


def test_schedule_work_counts_what_the_eval_ran():
    """bench.schedule_work walks the eval's own schedule code: on the official-size synthetic lengths it finds the
    step counts the eval reported on the H200 (seeds recipe, 1/8 share: 822 batch / 603 rolling steps,
    docs/drivers.md; all 50,000 docs: 4,445 steps at a graph fill of 0.9785, bench/results/eval-h200.json), both
    schedules cover the same real window positions, and the rolling schedule has no step of 8 rows or fewer."""
    from bench.schedule_work import work

    share = {r["schedule"]: r for r in work("seeds", (0, 8))}
    assert share["batch"]["steps"] == 822 and share["rolling"]["steps"] == 603
    assert share["batch"]["real_positions"] == share["rolling"]["real_positions"]
    assert share["rolling"]["steps_8_rows_or_fewer"] == 0 < share["batch"]["steps_8_rows_or_fewer"]
    full = {r["schedule"]: r for r in work("seeds", (0, 1))}
    assert full["batch"]["steps"] == 4445 and full["batch"]["fill"] == 0.9785
    assert all(0 < r["fill"] <= 1 for r in (*share.values(), *full.values()))
    # case (c) as run (records' recipe, 3 phases, 1/8 share, rolling, CUDA graphs): 4,669 steps at a fill of 0.878
    # (bench/results/eval-h200.md); a finer window step pads less over the same steps
    ph = {(r["schedule"], r["l_step"]): r for step in (None, 48) for r in work("records", (0, 8), phased=True, l_step=step)}
    assert ph["rolling", 256]["steps"] == 4669 and round(ph["rolling", 256]["fill"], 3) == 0.878
    # and the graphs it planned for its claim order: 75 of 160 (bench/results/eval-h200.md)
    assert ph["rolling", 256]["graphs"] == 75
    assert ph["batch", 48]["steps"] == ph["batch", 256]["steps"]
    assert ph["batch", 48]["bucketed_positions"] < ph["batch", 256]["bucketed_positions"]
    assert ph["batch", 48]["real_positions"] == ph["rolling", 256]["real_positions"]
    with pytest.raises(ValueError, match="has no phases"):
        work("seeds", (0, 8), phased=True)


def test_schedule_helpers_refuse_bad_arguments_by_name():
    """rolling_steps, graph_buckets and schedule_work.work name the argument they refuse (no hang on chunk 0)."""
    import numpy as np

    from bench.schedule_work import work
    from train.graphs import graph_buckets
    from train.rows import rolling_steps

    n = np.array([5, 3])
    for kw, match in ((dict(chunk=0), "chunk = 0"), (dict(rows=0), "rows = 0"), (dict(refill_below=0.0), "refill_below"),
                      (dict(claim=None), "claim"), (dict(n=np.array([[1]])), "n must be a 1-D array")):
        args = {**dict(n=n, chunk=2, rows=2, claim=lambda: None, refill_below=0.5), **kw}
        with pytest.raises((ValueError, TypeError), match=match):
            next(rolling_steps(**args))
    for bad, match in (((0, 1024, 256), "rows = 0"), ((64, 0, 256), "window = 0"), ((64, 1024, 0), "chunk = 0")):
        with pytest.raises(ValueError, match=match):
            graph_buckets(*bad)
    with pytest.raises(ValueError, match="recipe = 'x'"):
        work("x")
    with pytest.raises(ValueError, match=r"share = \(8, 8\)"):
        work("seeds", (8, 8))


def test_records_child_timeout_kills_its_process_group_and_keeps_its_output(tmp_path):
    """harness.run_child: a child that printed, started a grandchild holding its output open, then hung, comes
    back at its timeout (not when the grandchild ends) with what it printed, and the grandchild is killed too."""
    import sys
    import time

    from bench.harness import run_child

    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time\n"
              "print('warming up', flush=True)\n"
              "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(g.pid))\n"
              "time.sleep(60)\n")
    t0 = time.time()
    rc, out, err = run_child([sys.executable, "-c", script], 3.0, str(tmp_path / "logs"), "hang")
    assert rc is None and time.time() - t0 < 20
    assert "warming up" in out and (tmp_path / "logs" / "hang.log").read_text() == out
    gpid = int(pid_file.read_text())
    for _ in range(50):  # the group's SIGKILL reaches the grandchild: gone, or a zombie nobody reaped yet
        try:
            state = open(f"/proc/{gpid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"grandchild {gpid} still running")
    rc, out, _ = run_child([sys.executable, "-c", "print('RESULT {}')"], 30.0, str(tmp_path / "logs"), "ok")
    assert rc == 0 and out.strip() == "RESULT {}"
    # a repeat of the same child keeps the first one's logs
    rc, out, _ = run_child([sys.executable, "-c", "print('again')"], 30.0, str(tmp_path / "logs"), "ok")
    assert rc == 0 and out.strip() == "again"
    assert (tmp_path / "logs" / "ok.log").read_text().strip() == "RESULT {}"
    assert (tmp_path / "logs" / "ok-2.log").read_text().strip() == "again"


@pytest.mark.parametrize("value", ["-3", "many", "2.5"])
def test_records_env_int_refuses_by_name(monkeypatch, value):
    from bench.bench_records import env_int

    monkeypatch.setenv("PGOLF_RECORDS_TTT_COLD_DOCS", value)
    with pytest.raises(ValueError, match=f"PGOLF_RECORDS_TTT_COLD_DOCS='{re.escape(value)}': expected an integer >= 0"):
        env_int("PGOLF_RECORDS_TTT_COLD_DOCS", 0, 0)
    monkeypatch.setenv("PGOLF_RECORDS_TTT_COLD_DOCS", "16")
    assert env_int("PGOLF_RECORDS_TTT_COLD_DOCS", 0, 0) == 16


def test_records_heartbeat_reports_compile_progress(capsys):
    """The child's progress line counts what torch.compile did in this process: a compile in between moves it."""
    import torch

    from bench.bench_records import heartbeat_line, start_heartbeat

    before = heartbeat_line(1.0)
    assert before.startswith("[child 1 s] dynamo frames ")
    n0 = int(before.split("dynamo frames ")[1].split(",")[0])
    torch._dynamo.reset()
    f = torch.compile(lambda x: x * 2 + 1, backend="eager")
    f(torch.ones(3))
    after = heartbeat_line(2.0)
    assert int(after.split("dynamo frames ")[1].split(",")[0]) == n0 + 1
    start_heartbeat(0)  # off: no thread, nothing printed
    assert capsys.readouterr().err == ""


def test_records_train_caches_folder(monkeypatch, tmp_path):
    """PGOLF_RECORDS_TRAIN_CACHES: created when missing, refused by name when it names a file, "" when unset."""
    from bench.bench_records import train_caches

    monkeypatch.delenv("PGOLF_RECORDS_TRAIN_CACHES", raising=False)
    assert train_caches() == ""
    d = tmp_path / "caches"
    monkeypatch.setenv("PGOLF_RECORDS_TRAIN_CACHES", str(d))
    assert train_caches() == str(d) and d.is_dir()
    f = tmp_path / "file"
    f.write_text("x")
    monkeypatch.setenv("PGOLF_RECORDS_TRAIN_CACHES", str(f))
    with pytest.raises(ValueError, match="PGOLF_RECORDS_TRAIN_CACHES = .*expected a folder"):
        train_caches()


def test_warmup_bench_cold_and_warm_in_two_bench_processes(monkeypatch, tmp_path):
    """PGOLF_WARMUP_CACHES + PGOLF_WARMUP_RUNS: a cold-only bench fills DIR/<case>, a warm-only one runs on that
    folder; a cold run on a filled folder, a warm-only one on an empty folder or without DIR, and a bad run list
    are refused by name before any artifact is built."""
    from bench import bench_warmup

    calls = []

    def child(args, caches, timeout, profile=None):
        calls.append(caches)
        os.makedirs(os.path.join(caches, "inductor"), exist_ok=True)  # what a compile leaves behind
        return {"to_scoring_s": 1.0, "val_bpb": 1.0, "docs": 1}

    monkeypatch.setenv("PGOLF_WARMUP_CASES", "records-ref-rolling-tail")
    monkeypatch.setattr("train.synthetic.write_synthetic_val", lambda d, **k: "val.bin")
    monkeypatch.setattr(bench_warmup, "_tokenizer", lambda: "tok.model")
    monkeypatch.setattr(bench_warmup, "_child", child)
    root = tmp_path / "caches"
    monkeypatch.setenv("PGOLF_WARMUP_CACHES", str(root))
    for runs, match in (("warm,hot", "PGOLF_WARMUP_RUNS = 'warm,hot'"), ("", "PGOLF_WARMUP_RUNS = ''"),
                        ("warm", "is empty; run PGOLF_WARMUP_RUNS=cold first")):
        monkeypatch.setenv("PGOLF_WARMUP_RUNS", runs)
        monkeypatch.setattr("bench.bench_eval.build_artifact", lambda *a, **k: pytest.fail("built an artifact first"))
        with pytest.raises(ValueError, match=re.escape(match)):
            bench_warmup.run()
    monkeypatch.setattr("bench.bench_eval.build_artifact", lambda *a, **k: None)
    monkeypatch.setenv("PGOLF_WARMUP_RUNS", "cold")
    cold = bench_warmup.run()
    assert calls == [str(root / "records-ref-rolling-tail")] and "--tail-block" in cold[0]["case"]
    assert cold[0]["cold_val_bpb"] == 1.0 and "warm_val_bpb" not in cold[0]
    monkeypatch.setattr("bench.bench_eval.build_artifact", lambda *a, **k: pytest.fail("built an artifact first"))
    monkeypatch.setenv("PGOLF_WARMUP_RUNS", "cold,warm")
    with pytest.raises(ValueError, match="is not empty, so a cold run there would not be cold"):
        bench_warmup.run()
    monkeypatch.setattr("bench.bench_eval.build_artifact", lambda *a, **k: None)
    monkeypatch.setenv("PGOLF_WARMUP_RUNS", "warm")
    warm = bench_warmup.run()
    assert calls[1] == calls[0] and warm[0]["warm_val_bpb"] == 1.0 and "cold_val_bpb" not in warm[0]
    assert "earlier bench process" in warm[0]["warm_caches_from"]
    monkeypatch.delenv("PGOLF_WARMUP_CACHES")
    with pytest.raises(ValueError, match="PGOLF_WARMUP_RUNS = 'warm' needs PGOLF_WARMUP_CACHES"):
        bench_warmup.run()


def test_warmup_bench_cachefile_case_across_two_bench_processes(monkeypatch, tmp_path):
    """Under PGOLF_WARMUP_CACHES the compile-cache file lives in that folder: the cold bench writes it there, the
    warm-only bench hands it to a process on empty folders; a cold run with the file present is refused by name."""
    from bench import bench_warmup

    calls = []

    def child(args, caches, timeout, profile=None):
        f = args[args.index("--compile-cache") + 1]
        calls.append((caches, f, os.path.isfile(f), os.listdir(caches)))
        os.makedirs(os.path.join(caches, "inductor"), exist_ok=True)
        open(f, "a").close()  # the eval writes the file at its end
        return {"to_scoring_s": 1.0, "val_bpb": 1.0, "docs": 1}

    name = "records-ref-rolling-tail-cachefile"
    monkeypatch.setenv("PGOLF_WARMUP_CASES", name)
    monkeypatch.setattr("train.synthetic.write_synthetic_val", lambda d, **k: "val.bin")
    monkeypatch.setattr("bench.bench_eval.build_artifact", lambda *a, **k: None)
    monkeypatch.setattr(bench_warmup, "_tokenizer", lambda: "tok.model")
    monkeypatch.setattr(bench_warmup, "_child", child)
    root = tmp_path / "caches"
    monkeypatch.setenv("PGOLF_WARMUP_CACHES", str(root))
    monkeypatch.setenv("PGOLF_WARMUP_RUNS", "warm")
    with pytest.raises(ValueError, match="compile-cache is missing; run PGOLF_WARMUP_RUNS=cold first"):
        os.makedirs(root / name / "inductor")
        bench_warmup.run()
    os.rmdir(root / name / "inductor")
    monkeypatch.setenv("PGOLF_WARMUP_RUNS", "cold")
    rows = bench_warmup.run()
    f = str(root / f"{name.replace('-cachefile', '')}.compile-cache")
    assert calls == [(str(root / name), f, False, [])] and "--tail-block + --compile-cache" in rows[0]["case"]
    with pytest.raises(ValueError, match="exists, so the cold process of records-ref-rolling-tail-cachefile would load it"):
        import shutil
        shutil.rmtree(root / name)
        bench_warmup.run()
    monkeypatch.setenv("PGOLF_WARMUP_RUNS", "warm")
    os.makedirs(root / name / "inductor")
    bench_warmup.run()
    caches, f2, had, content = calls[1]
    assert f2 == f and had and caches != str(root / name) and content == []  # empty folders + the file


def test_records_ttt_row_prefers_the_regional_variant_and_keeps_every_variant(monkeypatch):
    """bench_records' TTT row: with patched-regional run, it is the row's "ours" (named in the case and ``variant``),
    the wall ratio is the record's wall over it, and every variant's figures stay in ``variants``."""
    from bench import bench_records as br

    walls = {"record": 300.0, "patched": 280.0, "patched-regional": 150.0}

    def spawn(args, timeout, caches="", **env):
        if args[1] == "ttt-artifact":
            return {"quant_bytes": 1, "serialize_s": 0.1}, ""
        v = args[args.index("--variant") + 1]
        return {"wall_s": walls[v], "peak_mb": 1.0, "patch": v}, v

    monkeypatch.setenv("PGOLF_RECORDS_TTT_VARIANTS", "record,patched,patched-regional")
    monkeypatch.setattr(br, "_spawn", spawn)
    monkeypatch.setattr(br, "_write_ttt_shards", lambda d, v, docs=0: None)
    monkeypatch.setattr(br, "ttt_times", lambda log: {"eval_s": walls[log] / 3, "warmup_s": 1.0, "val_bpb": 1.5,
                                                      "val_loss": 1.0})
    monkeypatch.setattr(br, "_save", lambda rows: None)
    rows = []
    br._ttt_rows(rows, budget=1e6, t0=__import__("time").time())
    (row,) = rows
    assert row["variant"] == "patched-regional" and row["case"].endswith("; patched-regional)")
    assert row["wall_speedup"] == 2.0 and row["ours_ms"] == 50000.0 and row["patch"] == "patched-regional"
    assert sorted(row["variants"]) == ["patched", "patched-regional", "record"]
    assert row["variants"]["patched"]["wall_s"] == 280.0


def test_records_ttt_kept_caches_and_a_timed_out_variant(monkeypatch, tmp_path):
    """PGOLF_RECORDS_TTT_CACHES: each TTT variant's child runs on DIR/ttt-<key>-<variant>, "cold" while empty and
    "warm (...)" once an earlier child filled it; a variant whose child times out is reported in the row's
    ``variants`` and the other variant's figures stay in the row."""
    from bench import bench_records as br

    seen = []

    def spawn(args, timeout, caches="", **env):
        if args[1] == "ttt-artifact":
            return {"quant_bytes": 1, "serialize_s": 0.1}, ""
        v = args[args.index("--variant") + 1]
        seen.append((v, caches))
        os.makedirs(os.path.join(caches, "inductor"), exist_ok=True)
        with open(os.path.join(caches, "inductor", "graph"), "w") as f:  # what a child leaves behind
            f.write("x")
        if v == "record":
            raise RuntimeError("child --child ttt --variant record timed out after 529 s; last output:\nphase:1/3")
        return {"wall_s": 270.0, "peak_mb": 1.0, "patch": v}, v

    monkeypatch.setenv("PGOLF_RECORDS_TTT_CACHES", str(tmp_path / "c"))
    monkeypatch.setenv("PGOLF_RECORDS_TTT_VARIANTS", "record,patched-regional")
    monkeypatch.setattr(br, "_spawn", spawn)
    monkeypatch.setattr(br, "_write_ttt_shards", lambda d, v, docs=0: None)
    monkeypatch.setattr(br, "ttt_times", lambda log: {"eval_s": 140.0, "warmup_s": 118.0, "val_bpb": 2.4,
                                                      "val_loss": 8.9})
    monkeypatch.setattr(br, "_save", lambda rows: None)
    for state in ("cold", "warm (1 cache files from an earlier child)"):
        rows = []
        br._ttt_rows(rows, budget=1e6, t0=__import__("time").time())
        (row,) = rows
        assert row["caches"] == row["baseline_caches"] == state
        assert row["variants"]["record"]["failed"].startswith("child --child ttt --variant record timed out after 529 s")
        assert row["variants"]["patched-regional"]["wall_s"] == 270.0 and row["wall_s"] == 270.0
        assert row["baseline_wall_s"] != row["baseline_wall_s"]  # NaN: not measured
    assert sorted({c for _, c in seen}) == [str(tmp_path / "c" / "ttt-2026-04-29-patched-regional"),
                                            str(tmp_path / "c" / "ttt-2026-04-29-record")]


def test_records_artifact_hash_names_the_bytes(tmp_path):
    """folder_sha256: equal for equal files, changed by one byte or one name, blind to the bench's made.json."""
    from bench.bench_records import folder_sha256

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
        (d / "final_model.ptz").write_bytes(bytes(range(256)) * 3)
        (d / "sub" / "x.bin").write_bytes(b"\x00\x01")
    (a / "made.json").write_text('{"docs": 200}')
    assert folder_sha256(str(a)) == folder_sha256(str(b))
    (b / "sub" / "x.bin").write_bytes(b"\x00\x02")
    assert folder_sha256(str(a)) != folder_sha256(str(b))
    (b / "sub" / "x.bin").write_bytes(b"\x00\x01")
    (b / "sub" / "x.bin").rename(b / "sub" / "y.bin")
    assert folder_sha256(str(a)) != folder_sha256(str(b))
    with pytest.raises(FileNotFoundError, match="folder_sha256: folder .* does not exist"):
        folder_sha256(str(tmp_path / "missing"))


def test_records_ttt_floats_modes_are_refused_by_name(monkeypatch, capsys, tmp_path):
    """bench.records_ttt_floats: --warmup with --batch-sizes, an unknown variant, and variants without a mode that
    takes them are refused before any child starts; the batch-size table lists each size's graph count."""
    from bench import records_ttt_floats as rt

    for argv, msg in ((["--warmup", "--batch-sizes"], "--warmup and --batch-sizes: pick one"),
                      (["--batch-sizes", "--variants", "record,eager"], "--variants 'record,eager': expected"),
                      (["--variants", "patched-regional"], "(with --warmup or --batch-sizes)")):
        monkeypatch.setattr(sys, "argv", ["records_ttt_floats"] + argv)
        with pytest.raises(SystemExit):
            rt.main()
        assert msg in capsys.readouterr().err
    rows = [dict(variant="record", graphs=5, calls=[dict(bsz=6, seconds=1.0, graphs_so_far=2),
                                                     dict(bsz=3, seconds=2.0, graphs_so_far=3)])]
    rt._write_bsz(str(tmp_path / "t"), dict(torch="t", date="d"), rows)
    assert "| record | 5 | 6: 1.0 s, 2; 3: 2.0 s, 3 |" in (tmp_path / "t.md").read_text()


def test_records_ttt_a_log_without_its_score_line_fails_that_variant_only(monkeypatch):
    """A TTT child that exits without the record's 'quantized_ttt_phased ... val_bpb' line is that variant's failure:
    the row keeps the other variant's figures."""
    from bench import bench_records as br

    def spawn(args, timeout, caches="", **env):
        if args[1] == "ttt-artifact":
            return {"quant_bytes": 1, "serialize_s": 0.1}, ""
        v = args[args.index("--variant") + 1]
        return {"wall_s": 100.0, "peak_mb": 1.0, "patch": v}, v

    def times(log):
        if log == "record":
            raise RuntimeError("no 'quantized_ttt_phased val_loss:... val_bpb:... eval_time:...ms' line in the log")
        return {"eval_s": 50.0, "warmup_s": 40.0, "val_bpb": 2.4, "val_loss": 8.9}

    monkeypatch.delenv("PGOLF_RECORDS_TTT_CACHES", raising=False)
    monkeypatch.setenv("PGOLF_RECORDS_TTT_VARIANTS", "record,patched-regional")
    monkeypatch.setattr(br, "_spawn", spawn)
    monkeypatch.setattr(br, "_write_ttt_shards", lambda d, v, docs=0: None)
    monkeypatch.setattr(br, "ttt_times", times)
    monkeypatch.setattr(br, "_save", lambda rows: None)
    rows = []
    br._ttt_rows(rows, budget=1e6, t0=__import__("time").time())
    (row,) = rows
    assert row["variants"]["record"]["failed"].startswith("no 'quantized_ttt_phased")
    assert row["val_bpb"] == 2.4 and row["wall_s"] == 100.0


def test_run_child_stops_when_asked_and_keeps_the_output(tmp_path):
    """harness.run_child(stop_when=...): the child is stopped (its whole group) as soon as the predicate holds on
    what it printed so far, long before its timeout; the output up to there is returned."""
    import time

    from bench.harness import run_child

    script = "import time\nprint('step 1', flush=True)\nprint('READY', flush=True)\ntime.sleep(60)\n"
    t0 = time.time()
    rc, out, _ = run_child([sys.executable, "-c", script], 50.0, str(tmp_path / "logs"), "stop",
                           stop_when=lambda text: "READY" in text, poll_s=0.1)
    assert rc is None and time.time() - t0 < 20 and "step 1" in out and "READY" in out
    rc, out, _ = run_child([sys.executable, "-c", "print('done')"], 50.0, str(tmp_path / "logs"), "done",
                           stop_when=lambda text: False, poll_s=0.1)
    assert rc == 0 and out.strip() == "done"


def test_warmup_child_reads_the_first_score_from_a_stopped_driver(monkeypatch, tmp_path):
    """bench_warmup._child: a driver stopped after logging its first-score line (train.eval.first_score_line)
    gives a partial report with that figure, whether the bench stopped it there (STOP_AT_FIRST) or at its time
    limit; one stopped before that line is a timeout, not a number."""
    import subprocess

    from bench import bench_warmup
    from train.eval import first_score_line

    fake = tmp_path / "fake-python"
    line = first_score_line(4.91)
    fake.write_text(f"#!/bin/sh\necho '[eval] load 0.1 s'\necho '{line}'\nsleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    monkeypatch.setattr(bench_warmup, "STOP_AT_FIRST", True)
    rep = bench_warmup._child(["--x"], str(tmp_path / "c1"), timeout=50.0)
    assert rep["first_score_s"] == 4.91 and rep["stopped"] == "at its first score" and rep["child_wall_s"] < 20
    assert bench_warmup._split(rep, "warm")["warm_first_score_s"] == 4.91
    monkeypatch.setattr(bench_warmup, "STOP_AT_FIRST", False)
    rep = bench_warmup._child(["--x"], str(tmp_path / "c2"), timeout=2.0)
    assert rep["first_score_s"] == 4.91 and "limit" in rep["stopped"]
    fake.write_text("#!/bin/sh\necho '[eval] load 0.1 s'\nsleep 60\n")
    with pytest.raises(subprocess.TimeoutExpired):
        bench_warmup._child(["--x"], str(tmp_path / "c3"), timeout=2.0)
    assert first_score_line(None) == "[eval] first score in (process age unknown)"


def test_warmup_bench_refuses_stop_at_first_score_with_a_cache_file_case(monkeypatch):
    """A --compile-cache case's cold child writes its file at exit, so stopping it at its first score is refused by
    name before any work."""
    from bench import bench_warmup

    monkeypatch.setattr(bench_warmup, "STOP_AT_FIRST", True)
    monkeypatch.setenv("PGOLF_WARMUP_CASES", "seeds-ref-cachefile")
    monkeypatch.setattr(bench_warmup, "_child", lambda *a, **k: pytest.fail("a child ran"))
    with pytest.raises(ValueError, match="PGOLF_WARMUP_STOP_AT_FIRST_SCORE=1 with .'seeds-ref-cachefile'."):
        bench_warmup.run()


def test_records_eager_model_torch_keeps_modules_eager_and_forwards_the_rest():
    """PGOLF_RECORDS_TRAIN_EAGER_MODEL's stand-in ``torch``: compile of a module or of its bound method returns it
    unchanged; a plain function is still compiled by torch; every other attribute is torch's; setting one is refused."""
    import torch

    from bench.bench_records import EagerModelTorch

    t = EagerModelTorch(torch)
    m = torch.nn.Linear(2, 2)
    assert t.compile(m, dynamic=False, fullgraph=True) is m
    assert t.compile(m.forward, dynamic=False) == m.forward
    f = lambda x: x + 1  # noqa: E731
    g = t.compile(f, backend="eager")
    assert g is not f and torch.equal(g(torch.ones(2)), torch.full((2,), 2.0))
    assert t.float32 is torch.float32 and t.nn is torch.nn and t.zeros(2).shape == (2,)
    with pytest.raises(AttributeError, match="setting torch.compile"):
        t.compile = None


def test_parallel_compile_bench_parts_are_the_evals(capsys):
    """bench.parallel_compile names the eval's own --warmup-part children (train.eval.PARALLEL_PARTS), and its CLI
    refuses an unknown row by name."""
    from bench import parallel_compile as pc
    from train.eval import PARALLEL_PARTS

    assert set(pc.TTT_PARTS) | {"global"} == set(PARALLEL_PARTS)
    with pytest.raises(SystemExit):
        pc.main(["--only", "nope"])
    assert "--only" in capsys.readouterr().err


def test_env_flag_takes_0_or_1_and_refuses_anything_else_by_name(monkeypatch):
    """harness.env_flag: "1" on, "0" off, unset or "" the default; "yes", "true", "2" refused, naming the variable."""
    from bench.harness import env_flag

    monkeypatch.delenv("PGOLF_TEST_FLAG", raising=False)
    assert env_flag("PGOLF_TEST_FLAG") is False and env_flag("PGOLF_TEST_FLAG", True) is True
    for raw, want in (("1", True), ("0", False), ("", True)):
        monkeypatch.setenv("PGOLF_TEST_FLAG", raw)
        assert env_flag("PGOLF_TEST_FLAG", True) is want
    for raw in ("yes", "true", "2", " 1"):
        monkeypatch.setenv("PGOLF_TEST_FLAG", raw)
        with pytest.raises(ValueError, match=r"PGOLF_TEST_FLAG = .*expected 1 \(on\) or 0 \(off\)"):
            env_flag("PGOLF_TEST_FLAG")


def test_profile_ttt_kernel_categories_and_refusals():
    """bench.profile_ttt sorts every CUDA kernel of a step into a category by its name (the H200 records step's own
    kernel names: cuDNN attention, cuBLAS nvjet GEMMs, Inductor and package Triton kernels, the foreach optimizer,
    PyTorch's element-wise kernels), and refuses a bad --new-shapes or --variants before building anything."""
    from bench.profile_ttt import kernel_category, main

    cases = {"cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26": "attention",
             "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*": "attention",
             "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT": "gemm",
             "triton_poi_fused__fused_rms_norm_add_cat_mul_slice_sub_transpose": "triton",
             "_dx_kernel": "triton",
             "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::": "optimizer",
             "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast": "elementwise",
             "Memcpy DtoD (Device -> Device)": "other"}
    assert {n: kernel_category(n) for n in cases} == cases
    # the pass groups of docs/STATUS.md's ledger, on kernel names of measurement 6 and the package's own kernels
    from bench.profile_ttt import pass_group

    groups = {"cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26": "attention",
              "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT": "gemm",
              "_linear_act_kernel": "gemm",
              "_adam_rows_kernel": "optimizer",
              "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::": "optimizer",
              "triton_poi_fused__fused_rms_norm_add_cat_mul_slice_sub_transpose_unsqueeze_view_5": "qk_norm_rope",
              "triton_per_fused__fused_rms_norm__fused_rms_norm_backward_add_mul_neg_slice_slice_backward": "qk_norm_rope",
              "_head_norm_rope_bwd_kernel": "qk_norm_rope",
              "triton_poi_fused_leaky_relu_leaky_relu_backward_mul_pow_view_4": "mlp_act",
              "triton_per_fused__fused_rms_norm_add_mul_view_10": "norm_residual",
              "triton_poi_fused__fused_rms_norm__fused_rms_norm_backward__unsafe_view_clone_multi_lora_bw": "norm_residual",
              "_effective_kernel": "lora",
              "void at::native::indexFuncLargeIndex<float, long, unsigned int, 2, 2, -2, true": "index",
              "triton_poi_fused__unsafe_view_clone_transpose_view_7": "copy",
              "triton_poi_fused_add_mul_view_14": "other"}
    assert {n: pass_group(n) for n in groups} == groups
    with pytest.raises(SystemExit, match="--new-shapes: -1; expected an integer >= 0"):
        main(["--new-shapes", "-1", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--variants: 'kernel-fast'"):
        main(["--variants", "kernel-fast", "--device", "cpu"])


def test_profile_ttt_variant_names():
    """A variant's suffixes come in one order (tail, fused or torchopt, mlp, qk or noqk, res or nores, rowmap, sub,
    autotune) and set what they name (fused, qk and res: the eval's auto without a suffix); the rest is refused by
    name before anything is built."""
    from bench.profile_ttt import _variant, main

    assert _variant("kernel-compile") == {"path": "kernel", "mode": "compile", "tail": False, "fused": None,
                                          "mlp": None, "qk": None, "res": None, "rowmap": False,
                                          "t128": False, "dxk": False, "b0": False, "ws": False, "gws": False, "sgn": False, "skp": False, "fk": False, "jf": False, "nrm": False, "of": False, "rws": False, "dact": False, "sws": False, "qws": False, "kbh": False, "qkbh": False, "eff": None, "wt": None, "autotune": False}
    assert _variant("reference-compile-tail-fused-autotune") == {"path": "reference", "mode": "compile", "tail": True,
                                                                 "fused": True, "mlp": None, "qk": None, "res": None,
                                                                 "rowmap": False, "t128": False, "dxk": False, "b0": False, "ws": False, "gws": False, "sgn": False, "skp": False, "fk": False, "jf": False, "nrm": False, "of": False, "rws": False, "dact": False, "sws": False, "qws": False, "kbh": False, "qkbh": False, "eff": None, "wt": None,
                                                                 "autotune": True}
    assert _variant("kernel-compile-tail-mlp-res") == {"path": "kernel", "mode": "compile", "tail": True,
                                                       "fused": None, "mlp": True, "qk": None, "res": True,
                                                       "rowmap": False, "t128": False, "dxk": False, "b0": False, "ws": False, "gws": False, "sgn": False, "skp": False, "fk": False, "jf": False, "nrm": False, "of": False, "rws": False, "dact": False, "sws": False, "qws": False, "kbh": False, "qkbh": False, "eff": None, "wt": None, "autotune": False}
    assert _variant("kernel-compile-tail-noqk")["qk"] is False
    assert _variant("kernel-compile-tail-sws-qws")["sws"] is True and _variant("kernel-compile-tail-qws-sws") is None
    assert _variant("kernel-compile-tail-kbh-qkbh") is None   # one layout per variant
    assert _variant("kernel-compile-tail-fused-mlp")["mlp"] is True
    assert _variant("kernel-compile-tail-nomlp-qk")["mlp"] is False
    assert _variant("kernel-compile-tail-mlp-qk") == {"path": "kernel", "mode": "compile", "tail": True, "fused": None,
                                                      "mlp": True, "qk": True, "res": None, "rowmap": False,
                                                      "t128": False, "dxk": False, "b0": False, "ws": False, "gws": False, "sgn": False, "skp": False, "fk": False, "jf": False, "nrm": False, "of": False, "rws": False, "dact": False, "sws": False, "qws": False, "kbh": False, "qkbh": False, "eff": None, "wt": None, "autotune": False}
    assert _variant("reference-eager-torchopt")["fused"] is False
    assert _variant("kernel-compile-tail-res-rowmap")["rowmap"] is True
    assert _variant("kernel-compile-tail-nores")["res"] is False
    assert _variant("kernel-compile-tail-mlp-rowmap-t128")["t128"] is True
    assert _variant("kernel-compile-tail-t128-dxk")["dxk"] is True
    assert _variant("kernel-compile-tail-dxk-t128") is None
    assert _variant("kernel-compile-tail-b0-ws")["b0"] is True and _variant("kernel-compile-tail-b0-ws")["ws"] is True
    assert _variant("kernel-compile-tail-ws-b0") is None
    assert _variant("kernel-compile-tail-ws-sgn")["sgn"] is True and _variant("kernel-compile-tail-sgn-ws") is None
    assert _variant("kernel-compile-tail-ws-gws-sgn")["gws"] is True and _variant("kernel-compile-tail-gws-ws") is None
    assert _variant("kernel-compile-tail-ws-eff3")["eff"] == 3 and _variant("kernel-compile-tail")["eff"] is None
    for bad_eff in ("kernel-compile-tail-eff", "kernel-compile-tail-eff12", "kernel-compile-tail-eff1-ws"):
        assert _variant(bad_eff) is None, bad_eff
    assert _variant("kernel-compile-tail-sws-eff1-wt2")["wt"] == 2 and _variant("kernel-compile-tail")["wt"] is None
    for bad_wt in ("kernel-compile-tail-wt", "kernel-compile-tail-wt12", "kernel-compile-tail-wt1-eff1",
                   "kernel-compile-tail-wt1-sws"):
        assert _variant(bad_wt) is None, bad_wt
    for bad in ("kernel", "kernel-fast", "reference-compile-fused-tail", "kernel-compile-fused-torchopt",
                "kernel-compile-tail-tail", "reference-eager-autotune", "kernel-compile-extra", "kernel-compile-mlp-tail",
                "kernel-compile-qk-mlp", "kernel-compile-qk-noqk", "kernel-compile-noqk-mlp", "kernel-compile-res-mlp",
                "kernel-compile-autotune-res", "kernel-compile-rowmap-res", "kernel-compile-res-nores",
                "kernel-compile-nores-qk", "kernel-compile-mlp-nomlp", "kernel-compile-qk-nomlp", "kernel-compile-t128-rowmap", "kernel-compile-autotune-t128"):
        assert _variant(bad) is None, bad
        with pytest.raises(SystemExit, match=f"--variants: '{bad}'; expected"):
            main(["--variants", bad, "--device", "cpu"])
    with pytest.raises(SystemExit, match="'kernel-compile-tail-eff9': lora_merged.EFFECTIVE_CONFIGS has 7 tiles"):
        main(["--variants", "kernel-compile-tail,kernel-compile-tail-eff9", "--device", "cpu"])
    with pytest.raises(SystemExit, match="'kernel-compile-tail-wt7': linear_act_ws.TILES has 4 tiles"):
        main(["--variants", "kernel-compile-tail,kernel-compile-tail-wt7", "--device", "cpu"])


@pytest.fixture
def tiny_profile_model(monkeypatch):
    """profile_ttt's artifact at train.eval_fixtures.tiny_config (2 layers, d 64, MLP 128: the fused kernels' multiples
    of 8 hold) instead of the default 11-layer d 512 model: the suffix tests check what each variant set and reported,
    which does not depend on the model's size. The default model's steps, the interpreted fused optimizer's ~370
    launches and the profiler's parse of their events took 35 s of the 3-variant optimizer run, 6 s at this model (2 CPU
    cores); the default artifact is still built and stepped by test_profile_ttt_work_only_on_cpu."""
    import bench.bench_eval as be
    from train.eval_fixtures import tiny_config

    real = be.build_artifact
    monkeypatch.setattr(be, "build_artifact", lambda *a, **k: real(*a, **dict(k, cfg=tiny_config())))


def test_profile_ttt_optimizer_suffixes_reach_the_step(tmp_path, tiny_profile_model):
    """-fused / -torchopt set the step's optimizer (reported per variant), whatever the path's auto default; a smoke
    run on the CPU at a tiny shape (the fused op's CPU dispatch is its torch reference)."""
    from bench.profile_ttt import main

    out = main(["--device", "cpu", "--batch", "2", "--window", "96", "--chunk", "32", "--rank", "4", "--steps", "1",
                "--top", "3", "--variants", "reference-eager-tail-fused,reference-eager-torchopt,reference-eager",
                "--out", str(tmp_path)])
    got = {k: v["fused_optimizer"] for k, v in out["variants"].items()}
    assert got == {"reference-eager-tail-fused": True, "reference-eager-torchopt": False, "reference-eager": False}
    assert all(v["step_ms"] > 0 for v in out["variants"].values())


def test_profile_ttt_t128_suffix_sets_the_tile_for_its_variant_only(tmp_path, tiny_profile_model):
    """-t128 puts the 128 x 128 tile (the derivative and residual epilogues' default before the split-epilogue tile)
    on those epilogues for that variant (reported with it) and nothing for the next; the override is empty after the
    run."""
    from bench.profile_ttt import main
    from pgolf_kernels import linear_act

    out = main(["--device", "cpu", "--batch", "2", "--window", "96", "--chunk", "32", "--rank", "4", "--steps", "1",
                "--top", "3", "--variants", "reference-eager-t128,reference-eager", "--out", str(tmp_path)])
    t128 = dict(BM=128, BN=128, BK=64, num_warps=4, num_stages=4)
    assert linear_act.GRAD_CONFIG != t128
    assert out["variants"]["reference-eager-t128"]["linear_act_tiles"] == {"leaky_relu_sq_grad": t128,
                                                                           "residual": t128}
    assert out["variants"]["reference-eager"]["linear_act_tiles"] == {}
    assert linear_act.TILE_OVERRIDE == {}


def test_profile_ttt_switch_suffixes_set_their_variant_only(tmp_path, tiny_profile_model):
    """-dxk / -b0 / -ws / -gws / -sgn / -skp / -fk / -jf / -nrm / -of / -rws / -dact / -kbh / -qkbh set their package switch for that variant (reported with it); the next variant
    and the process after the run see the values it started with."""
    from bench.profile_ttt import main
    from pgolf_kernels import linear_act, linear_residual, lora_merged
    from train import forward as fwd_mod
    from train import adapters as adapters_mod
    from train import model as model_mod

    mods = {"merged_dx_kernel": (lora_merged, "DX_KERNEL"), "block0_leaf": (fwd_mod, "BLOCK0_LEAF"),
            "mlp_up_ws": (linear_residual, "MLP_UP_WS"), "mlp_signs": (linear_residual, "MLP_SIGNS"),
            "act_grad_ws": (linear_act, "GRAD_WS"), "skip_kernel": (model_mod, "SKIP_KERNEL"),
            "skip_fork": (model_mod, "SKIP_FORK"), "join_fold": (model_mod, "JOIN_FOLD"), "norm_kernel": (model_mod, "NORM_KERNEL"), "o_fold": (adapters_mod, "O_FOLD"), "res_ws": (linear_residual, "RES_WS"),
            "mlp_down_act": (linear_residual, "MLP_DOWN_ACT"), "qk_layout": (model_mod, "QK_LAYOUT")}
    before = {k: getattr(m, a) for k, (m, a) in mods.items()}
    out = main(["--device", "cpu", "--batch", "2", "--window", "96", "--chunk", "32", "--rank", "4", "--steps", "1",
                "--top", "3", "--variants", "reference-eager-dxk-b0-ws-gws-sgn-skp-fk-jf-nrm-of-rws-dact-kbh,reference-eager,reference-eager-qkbh", "--out", str(tmp_path)])
    on = out["variants"]["reference-eager-dxk-b0-ws-gws-sgn-skp-fk-jf-nrm-of-rws-dact-kbh"]
    assert (on["merged_dx_kernel"], on["block0_leaf"], on["mlp_up_ws"], on["act_grad_ws"], on["mlp_signs"],
            on["skip_kernel"], on["skip_fork"], on["join_fold"], on["norm_kernel"], on["o_fold"], on["res_ws"],
            on["mlp_down_act"], on["qk_layout"]) == (True, False, True, True, True, True, True, True, True, True, True,
                                                     True, "k-bhtd")
    assert out["variants"]["reference-eager-qkbh"]["qk_layout"] == "bhtd"
    assert {k: out["variants"]["reference-eager"][k] for k in mods} == before
    assert {k: getattr(m, a) for k, (m, a) in mods.items()} == before


def test_profile_ttt_mlp_and_qk_suffixes_reach_the_step(tmp_path, monkeypatch, tiny_profile_model):
    """-mlp runs the step with TTTConfig.fused_mlp (the records' targets: up and down merged per row), -qk with
    TTTConfig.fused_qk, on both paths; a smoke run on the CPU at a tiny shape. The ops take their torch references here (TRITON_INTERPRET off for this
    test: the interpreter runs the default model's d 512 kernels at minutes a step; tests/test_fused_mlp.py runs the
    kernels themselves)."""
    from bench.profile_ttt import main
    from conftest import torch_references

    torch_references(monkeypatch)
    out = main(["--device", "cpu", "--recipe", "records", "--batch", "2", "--window", "96", "--chunk", "32", "--rank",
                "4", "--steps", "1", "--top", "3", "--variants", "reference-eager-tail-mlp,kernel-eager-tail-mlp-qk,"
                "reference-eager-tail", "--sites", "--out", str(tmp_path)])
    got = {k: (v["fused_mlp"], v["fused_qk"]) for k, v in out["variants"].items()}
    assert all(v["sites"] == {} for v in out["variants"].values())  # --sites ran (no CUDA kernels on a CPU)
    assert got == {"reference-eager-tail-mlp": (True, False), "kernel-eager-tail-mlp-qk": (True, True),
                   "reference-eager-tail": (False, False)}
    assert all(v["step_ms"] > 0 for v in out["variants"].values())


def test_profile_ttt_step_work_counts_gemms_and_causal_attention():
    """bench.profile_ttt.step_work counts a step's GEMM FLOPs (forward, dX, dW) and its attention FLOPs as the
    FlashAttention convention does (causal: about half the score matrix; backward 2.5x the forward), and
    work_floor turns them into times at the data-sheet peaks; checked on a step whose work is known in closed form."""
    import torch.nn.functional as F

    from bench.profile_ttt import OPT_BYTES_PER_PARAM, PEAK_BYTES, PEAK_FLOPS, step_work, work_floor

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S, D, M, K, N = 2, 4, 2, 16, 8, 32, 24, 40
    x = torch.randn(M, K, generator=g)
    w = torch.randn(K, N, generator=g, requires_grad=True)
    q = torch.randn(B, H, S, D, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, generator=g, requires_grad=True)

    def step(_):
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        z = F.scaled_dot_product_attention(q[:, :, -3:], k, v, attn_mask=torch.ones(3, S, dtype=torch.bool),
                                           enable_gqa=True)
        ((x @ w).square().sum() + y.sum() + z.sum()).backward()

    work = step_work(step, None)
    assert work["gemm_flop"] == 2 * 2 * M * K * N  # forward and dW (x needs no gradient)
    causal = 4.0 * B * H * S * S * D * (S + 1) / (2 * S)
    masked = 4.0 * B * H * 3 * S * D
    assert work["attention_fwd_flop"] == pytest.approx(causal + masked)
    assert work["attention_bwd_flop"] == pytest.approx(2.5 * (causal + masked))
    assert F.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"  # restored
    fl = work_floor(work, 1000, scale=4.0)
    assert fl["gemm_tflop"] == round(4 * work["gemm_flop"] / 1e12, 3)
    assert fl["floor_ms_at_peak"]["optimizer"] == round(OPT_BYTES_PER_PARAM * 1000 / PEAK_BYTES * 1e3, 2)
    want = (4 * (work["gemm_flop"] + 3.5 * (causal + masked)) / PEAK_FLOPS + OPT_BYTES_PER_PARAM * 1000 / PEAK_BYTES)
    assert fl["floor_ms_total"] == pytest.approx(want * 1e3, abs=0.02)


def test_profile_ttt_step_work_repeats_kv_heads_for_the_counter(monkeypatch):
    """On CUDA the flop counter's cuDNN attention formula asserts equal q and k/v heads, which stopped a GQA step's
    count on the H200: step_work hands SDPA repeated k/v heads (the same attention) and counts the call from the
    shapes it was given. Checked with an SDPA that refuses unequal heads, as that formula does."""
    import torch.nn.functional as F

    from bench.profile_ttt import step_work

    real = F.scaled_dot_product_attention

    def strict(q, k, v, *args, **kwargs):
        assert q.size(-3) == k.size(-3) == v.size(-3), "query/key/value shapes are incompatible"
        assert not kwargs.get("enable_gqa", False)
        return real(q, k, v, *args, **kwargs)

    g = torch.Generator().manual_seed(11)
    B, H, Hkv, S, D = 2, 4, 2, 8, 16
    q = torch.randn(B, H, S, D, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, generator=g, requires_grad=True)
    want = real(q, k, v, is_causal=True, enable_gqa=True)
    got = {}

    def step(_):
        got["y"] = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        got["y"].sum().backward()

    monkeypatch.setattr(F, "scaled_dot_product_attention", strict)
    work = step_work(step, None)
    assert F.scaled_dot_product_attention is strict  # restored to what it was
    torch.testing.assert_close(got["y"], want, rtol=0, atol=1e-6)
    assert work["attention_calls"][0]["k"] == [B, Hkv, S, D]  # counted as called, not as repeated
    assert work["attention_fwd_flop"] == pytest.approx(4.0 * B * H * S * S * D * (S + 1) / (2 * S))


def test_profile_ttt_smaller_windows_drop_a_step_that_does_not_fit():
    """--first-call and the new-shape steps build the recipe at a smaller window: the records' graph window step
    (96) is kept where it fits and dropped below it, where TTTConfig would refuse it (--first-call 64x64 did)."""
    from bench.profile_ttt import _at_window
    from train.ttt_config import recipe

    cfg = recipe("records")
    assert cfg.graph_window_step == 96
    assert _at_window(cfg, 64).window == 64 and _at_window(cfg, 64).graph_window_step is None
    assert _at_window(cfg, 1984).graph_window_step == 96


def test_profile_ttt_work_only_on_cpu(tmp_path):
    """--work-only counts the reference step's work on a CPU (the counts do not depend on the device), scales the
    rows counted to the batch, and refuses a bad --work-rows or an -autotune variant without compile by name."""
    from bench.profile_ttt import main

    with pytest.raises(SystemExit, match="--work-rows: -1; expected an integer >= 0"):
        main(["--work-rows", "-1", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--variants: 'reference-eager-autotune'"):
        main(["--variants", "reference-eager-autotune", "--device", "cpu"])
    for bad in ("64", "1x64", "axb"):
        with pytest.raises(SystemExit, match="--first-call: .*expected ROWSxWINDOW"):
            main(["--first-call", bad, "--device", "cpu"])
    with pytest.raises(SystemExit, match="--first-call: '8x64'; expected at most --batch"):
        main(["--first-call", "8x64", "--batch", "4", "--window", "96", "--chunk", "32", "--work-only", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--work-rows: 9; expected at most --batch"):
        main(["--work-only", "--work-rows", "9", "--batch", "4", "--window", "96", "--chunk", "32", "--device", "cpu"])
    common = ["--work-only", "--batch", "4", "--window", "96", "--chunk", "32", "--rank", "4", "--device", "cpu",
              "--variants", "reference-compile"]
    one = main(common + ["--work-rows", "1"])["work"]["full"]
    four = main(common + ["--out", str(tmp_path)])["work"]["full"]
    assert (tmp_path / "profile_ttt.json").exists() and one["rows_counted"] == 1 and four["rows_counted"] == 4
    # work is linear in rows: one row scaled to four equals four rows counted
    assert one["floor"] == four["floor"]
    assert four["floor"]["gemm_tflop"] > 0 and four["attention_fwd_flop"] > 0



def test_ttt_optim_bench_times_the_eval_adapters():
    """bench_ttt_optim steps the adapters DocLoRA builds for the default model at 64 rows: the seeds' recipe's
    10,878,976 fp32 parameters (the count step-work-cpu.md gives), per-row AdamW / Adam as the recipe names."""
    from bench.bench_ttt_optim import _adapters

    ad, cfg = _adapters("seeds", torch.device("cpu"))
    assert sum(p.numel() for p in ad.params) == 10_878_976 and cfg.batch_size == 64
    assert all(p.dtype == torch.float32 and p.shape[0] == 64 for p in ad.params)


def test_profile_ttt_launch_sites_name_the_op_and_its_custom_op():
    """launch_sites: each named kernel's launching op (with its input shapes) and the package's custom op around it,
    summed over launches, largest first, at most per_kernel sites; unnamed kernels are left out."""
    from types import SimpleNamespace as NS

    from bench.profile_ttt import launch_sites

    def k(name, us):
        return NS(name=name, duration=us)

    outer = NS(name="pgolf::multi_lora_bwd", cpu_parent=None, kernels=[])
    mid = NS(name="aten::to", cpu_parent=outer, kernels=[])
    ev = [outer, mid,
          NS(name="aten::copy_", cpu_parent=mid, input_shapes=[[64, 2048, 512], [64, 2048, 512], []],
             kernels=[k("elementwise_kernel", 300.0), k("other_kernel", 5.0)]),
          NS(name="aten::copy_", cpu_parent=mid, input_shapes=[[64, 2048, 512], [64, 2048, 512], []],
             kernels=[k("elementwise_kernel", 200.0)]),
          NS(name="aten::add_", cpu_parent=None, input_shapes=[[8], [8]], kernels=[k("elementwise_kernel", 100.0)]),
          NS(name="aten::index_add_", cpu_parent=None, kernels=[k("indexFuncLargeIndex", 40.0)])]
    got = launch_sites(ev, {"elementwise_kernel", "indexFuncLargeIndex"})
    assert got == {"elementwise_kernel": [["aten::copy_ [[64, 2048, 512], [64, 2048, 512]] in pgolf::multi_lora_bwd", 0.5],
                                          ["aten::add_ [[8], [8]]", 0.1]],
                   "indexFuncLargeIndex": [["aten::index_add_", 0.04]]}
    assert launch_sites(ev, {"elementwise_kernel"}, per_kernel=1) == {
        "elementwise_kernel": [["aten::copy_ [[64, 2048, 512], [64, 2048, 512]] in pgolf::multi_lora_bwd", 0.5]]}


def test_attention_bench_rows_on_tiny_shapes():
    """bench.bench_attention's rows at a tiny shape on the CPU (the math backend, a stand-in timer): one row per K / V
    form and layout, each checked against the first before it is timed, with the fields the docs cite; a backend
    error is reported in its row, not raised."""
    from bench.bench_attention import measure

    calls = []
    rows = measure(torch.device("cpu"), 2, 16, 4, 2, 8, torch.float32, lambda f: (calls.append(f()), 1.0)[1])
    assert [r["case"].split(":")[0] for r in rows] == ["MATH-gqa-bthd", "MATH-gqa-contig", "MATH-expand-bthd",
                                                       "MATH-expand-contig"]
    assert len(calls) == 2 * len(rows)
    for r in rows:
        assert r["error"] == "" and r["max_rel_err"] < 1e-5 and r["speedup"] == 1.0
        assert r["per_step_ms_11_layers"] == 11.0 and r["fwd_bwd_tflops"] > 0


def test_warmup_bench_counts_the_triton_binaries_a_child_built(tmp_path):
    """triton_builds: only cubins written since the child's launch, the package's kernels by name in time order,
    Inductor's counted apart; an empty or missing folder builds nothing."""
    import os

    from bench.bench_warmup import triton_builds

    since = 1_000_000.0
    files = {"h1/_linear_act_kernel.cubin": since + 40.0, "h2/_linear_act_kernel.cubin": since + 12.5,
             "h3/_adam_rows_kernel.cubin": since + 30.0, "h4/triton_poi_fused_add_0.cubin": since + 8.0,
             "h5/triton_per_fused_rms_0.cubin": since + 20.0, "h6/_linear_act_kernel.cubin": since - 5.0,
             "h7/_linear_act_kernel.json": since + 41.0}
    for rel, t in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        os.utime(path, (t, t))
    got = triton_builds(str(tmp_path), since)
    assert got["package"] == 3 and got["inductor"] == 2
    assert got["package_by_name"] == {"_linear_act_kernel": 2, "_adam_rows_kernel": 1}
    assert got["package_timeline"] == [(12.5, "_linear_act_kernel"), (30.0, "_adam_rows_kernel"),
                                       (40.0, "_linear_act_kernel")]
    assert (got["package_first_s"], got["package_last_s"]) == (12.5, 40.0)
    assert (got["inductor_first_s"], got["inductor_last_s"]) == (8.0, 20.0)
    assert triton_builds(str(tmp_path), since + 100.0) == {"package": 0, "package_by_name": {}, "inductor": 0}
    assert triton_builds(str(tmp_path / "missing"), since)["package"] == 0
