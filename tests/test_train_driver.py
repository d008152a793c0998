"""train/train_gpt.py + train/config.py: tiny end-to-end runs on CPU (loss falls, artifact, budget stop,
2-rank gloo), configuration precedence and schedules."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from train.config import TrainConfig, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from train.fixture import build_fixture

    d = tmp_path_factory.mktemp("fx")
    rng = np.random.default_rng(0)
    words = "the a model token shard budget kernel train loss byte data of and to in is it on".split()
    docs = []
    for _ in range(400):
        # a learnable language: word bigrams follow a fixed successor table most of the time
        w = int(rng.integers(len(words)))
        out = []
        for _ in range(int(rng.integers(30, 90))):
            out.append(words[w])
            w = (w * 7 + 3) % len(words) if rng.random() < 0.8 else int(rng.integers(len(words)))
        docs.append(" ".join(out) + ".")
    src = d / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in docs) + "\n")
    info = build_fixture(str(d / "cache"), [str(src)], vocab_size=320, val_every=10, log=None)
    return info


def _args(tiny_data, tmp_path, **kw):
    base = dict(preset="tiny", data_path=tiny_data["train_pattern"], val_path=tiny_data["val_pattern"],
                tokenizer_path=tiny_data["tokenizer"], vocab_size=320, num_layers=2, model_dim=32, num_heads=2,
                num_kv_heads=1, seq_len=32, train_batch_tokens=512, max_micro_tokens=256, warmup_steps=1,
                log_every=10, val_batch_tokens=2048, runs_dir=str(tmp_path), run_id="t", reference=1,
                max_wallclock_seconds=0, matrix_lr=0.05, embed_lr=0.1, scalar_lr=0.05, ema_decay=0.9,
                compile=0)  # eager everywhere: on a GPU a compile per test would cost ~30 s each
    base.update(kw)
    out = []
    for k, v in base.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


def test_tiny_run_loss_falls_and_artifact_roundtrip(tiny_data, tmp_path):
    from train.train_gpt import main

    s = main(_args(tiny_data, tmp_path, iterations=40))
    assert s["steps"] == 40 and s["world_size"] == 1
    assert s["final_train_loss"] < s["first_loss"] - 1.0, s["losses"]
    pre, post = s["val_prequant"], s["val_quant"]
    assert pre["val_loss"] < np.log(320) - 1.0  # learned far below a uniform guess over the vocabulary
    assert pre["val_bpb"] is not None and 0 < pre["val_bpb"] < 10
    assert abs(post["val_loss"] - pre["val_loss"]) < 0.05  # int6 codes cost little on a tiny model
    a = s["artifact"]
    assert a["bytes_model"] == os.path.getsize(a["path"]) and a["bytes_total"] == a["bytes_model"] + a["bytes_code"]
    assert s["weights"] in ("raw", "ema")
    log = open(os.path.join(s["run_dir"], "train.log")).read()
    for needle in ("max_wallclock_seconds = 0.0", "matrix_lr = 0.05", "ms/step", "tok/s", "ETA", "warm-up: 1 steps"):
        assert needle in log, needle
    with open(os.path.join(s["run_dir"], "summary.json")) as f:
        assert json.load(f)["steps"] == 40


def test_wallclock_budget_stops_the_run(tiny_data, tmp_path):
    from train.train_gpt import main

    s = main(_args(tiny_data, tmp_path, iterations=10**6, max_wallclock_seconds=1.5, artifact=0, log_every=1000))
    assert 1 <= s["steps"] < 10**6
    # stops at the first step boundary past the budget: overshoot at most one step (+ timer noise)
    assert 1.5 <= s["train_seconds"] <= 1.5 + 3 * s["ms_per_step"] / 1000 + 0.5, s["train_seconds"]
    assert s["warmup_seconds"] > 0


def test_kernel_path_runs(tiny_data, tmp_path):
    """Without --reference: pgolf_kernels' Muon (under TRITON_INTERPRET=1 its Triton NS kernel, fp32)."""
    from train.train_gpt import main

    # the interpreter is slow (~5 s per NS launch set of 5 iterations here): 2 steps, no warm-up, 2 NS
    # iterations (a non-final and the final update: the kernels' two write paths; NS accuracy is
    # test_newton_schulz's), and 2 val windows of 32 tokens (M = 64: 4 row tiles of the interpreted int6
    # kernel; 640 tokens made the int6 eval ~10x longer)
    s = main(_args(tiny_data, tmp_path, iterations=2, warmup_steps=0, reference=0, artifact=1, val_max_tokens=65,
                   muon_ns_steps=2))
    assert s["steps"] == 2 and s["muon"].startswith("pgolf_kernels.muon")
    assert np.isfinite(s["final_train_loss"])
    assert "val_quant_int6" in s  # evaluated through Int6Linear codes too


def test_torch_banked_muon_matches_package_reference(tiny_data, tmp_path):
    from train.train_gpt import main

    a = main(_args(tiny_data, tmp_path, iterations=6, artifact=0, run_id="a", ema_decay=0,
                   val_max_tokens=2048))
    b = main(_args(tiny_data, tmp_path, iterations=6, artifact=0, run_id="b", ema_decay=0,
                   muon_impl="torch-banked", val_max_tokens=2048))
    assert b["muon"] == "torch-banked-ns"
    # same math, different batching: on CPU fp32 NS -> losses agree to fp32 noise; on a GPU both run bf16 NS
    # (Triton kernel vs torch bmm), whose rounding differences grow over 6 steps to ~1e-2 nats at most
    tol = 5e-2 if a["device"] != "cpu" else 1e-3
    assert abs(a["val_raw"]["val_loss"] - b["val_raw"]["val_loss"]) < tol


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_gloo_run(tiny_data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "train"] + _args(tiny_data, tmp_path, iterations=6, train_batch_tokens=1024)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(os.path.join(str(tmp_path), "t", "summary.json")) as f:
        s = json.load(f)
    assert s["world_size"] == 2 and s["steps"] == 6
    assert "backend gloo" in r.stdout and "2 ranks x 2 micro-steps" in r.stdout
    assert s["artifact"]["bytes_total"] > 0 and np.isfinite(s["val_quant"]["val_loss"])


# ------------------------------------------------------------------ config + schedules
def test_config_precedence_and_presets():
    c = parse_config([], env={}, cuda=True)
    assert c.preset == "full" and c.num_layers == 11 and c.max_wallclock_seconds == 600.0
    c = parse_config([], env={}, cuda=False)
    assert c.preset == "tiny" and c.num_layers == TrainConfig.TINY["num_layers"]
    c = parse_config(["--num-layers", "6"], env={"NUM_LAYERS": "5", "MAX_WALLCLOCK_SECONDS": "12.5",
                                                 "REFERENCE": "true"}, cuda=False)
    assert c.num_layers == 6 and c.max_wallclock_seconds == 12.5 and c.reference is True
    assert c.model_dim == TrainConfig.TINY["model_dim"]  # preset fills what was not set
    c = parse_config(["--reference"], env={}, cuda=True)
    assert c.reference is True
    with pytest.raises(SystemExit):
        parse_config(["--num-layers", "many"], env={}, cuda=True)
    with pytest.raises(SystemExit):
        parse_config(["--data-path", "x_*.bin"], env={}, cuda=True)  # val_path missing
    with pytest.raises(SystemExit):
        parse_config([], env={"PRESET": "huge"}, cuda=True)


def test_schedules():
    from train.train_gpt import lr_multiplier, muon_momentum

    c = TrainConfig(max_wallclock_seconds=100.0, warmdown_frac=0.5, iterations=1000)
    assert lr_multiplier(c, 0, 0.0) == 1.0 and lr_multiplier(c, 10, 50.0) == 1.0
    assert lr_multiplier(c, 10, 75.0) == pytest.approx(0.5) and lr_multiplier(c, 10, 100.0) == 0.0
    assert lr_multiplier(c, 900, 10.0) == pytest.approx(0.2)  # iterations end first: they drive the decay
    c2 = TrainConfig(max_wallclock_seconds=0, warmdown_frac=0.2, iterations=1000)
    assert lr_multiplier(c2, 900, 1e9) == pytest.approx(0.5)
    c3 = TrainConfig(muon_momentum_warmup_start=0.85, muon_momentum=0.95, muon_momentum_warmup_steps=100)
    assert muon_momentum(c3, 0) == pytest.approx(0.85) and muon_momentum(c3, 50) == pytest.approx(0.9)
    assert muon_momentum(c3, 10**6) == pytest.approx(0.95)
