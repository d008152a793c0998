"""train/checks.py and the drivers' fail-fast behaviour: every bad input is refused with one line
naming the argument, the value and what was expected, before the expensive part (model build,
warm-up, training), within seconds; the token stream never spins on empty shards; the artifact
container refuses duplicate / overlapping entries; the training driver chooses EMA vs raw weights
by a fixed rule and ends with the eval command for its artifact."""
import json
import os
import shlex
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from train import checks
from train.checks import CheckError
from train.data import DistributedTokenLoader, ShardError, TokenStream, write_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = os.path.join("fineweb_sample", "fineweb_sample200_sp1024_000000.bin")
SP1024 = "fineweb_1024_bpe.model"
NO_FALLBACK = os.path.join("tokenizers", "nonofficial_fineweb_1024_bpe_no_byte_fallback.model")
FAST_S = 10.0  # every refusal below must come within this many seconds

pytestmark = pytest.mark.usefixtures("one_thread")


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t
        return False


def _refused(fn, arg, *match):
    """fn() raises CheckError naming ``arg`` (and every ``match`` text) on one line, within FAST_S."""
    with Timer() as t, pytest.raises(CheckError) as ei:
        fn()
    msg = str(ei.value)
    assert msg.startswith(arg + " = "), msg
    assert "\n" not in msg and ": expected " in msg, msg
    for m in match:
        assert m in msg, (m, msg)
    assert t.s < FAST_S, t.s
    return msg


# ------------------------------------------------------------------------------------------ helpers
def test_range_helpers_name_argument_value_and_expectation():
    assert checks.int_range("--x", 3, 1, 5) == 3
    msg = _refused(lambda: checks.int_range("--stride", 0, 1, 256, "the step"), "--stride", "0", "[1, 256]", "the step")
    assert msg == "--stride = 0: expected an integer in [1, 256] (the step)"
    _refused(lambda: checks.int_range("--n", True, 0), "--n")  # a bool is not a count
    _refused(lambda: checks.float_range("--lr", -1.0, 0.0, lo_open=True), "--lr", "-1.0", "> 0")
    _refused(lambda: checks.float_range("--lr", float("nan"), 0.0), "--lr", "finite")
    _refused(lambda: checks.float_range("--lr", float("inf"), 0.0), "--lr", "finite")
    assert checks.share("--share", "1/4") == (1, 4) and checks.share("--share", None) is None
    for bad in ("3/2", "2/2", "-1/2", "1/0", "a/b", "1", "1/2/3"):
        _refused(lambda: checks.share("--share", bad), "--share", repr(bad))
    assert checks.budget("--budget", 600, "--margin", 30) == 570
    _refused(lambda: checks.budget("--budget", 30, "--margin", 30), "--budget", "more than --margin")
    _refused(lambda: checks.budget("--budget", 600, "--margin", -1), "--margin")
    assert checks.window("--window", 256, 256) == 256
    _refused(lambda: checks.window("--window", 0, 256), "--window", "trained sequence length 256")
    _refused(lambda: checks.window("--window", 257, 256), "--window", "257")


def test_shard_checks(tmp_path):
    write_shard(str(tmp_path / "a_0.bin"), [1, 5, 6, 7])
    write_shard(str(tmp_path / "zero_0.bin"), [])
    (tmp_path / "bad_0.bin").write_bytes(b"\x00" * 2000)
    assert checks.shards("--val", str(tmp_path / "a_*.bin")) == [(str(tmp_path / "a_0.bin"), 4)]
    _refused(lambda: checks.shards("--val", str(tmp_path / "none_*.bin")), "--val", "matches no file")
    _refused(lambda: checks.shards("--val", ""), "--val")
    _refused(lambda: checks.shards("--data-path", str(tmp_path / "zero_*.bin")), "--data-path", "holds 0 tokens")
    _refused(lambda: checks.shards("--val", str(tmp_path / "bad_*.bin")), "--val", "bad magic")
    _refused(lambda: checks.shards("--val", str(tmp_path / "a_*.bin"), min_tokens=5), "--val", "at least 5", "hold 4")


def test_token_ids_one_vectorized_check(tmp_path):
    toks = torch.from_numpy(np.array([1, 5, 1023, 7, 65535, 9], dtype=np.uint16))
    checks.token_ids("--val", "v_*.bin", toks[:4], 1024)
    _refused(lambda: checks.token_ids("--val", "v_*.bin", toks, 1024, "s.bin"), "--val", "'v_*.bin'", "id 65535",
             "vocabulary size 1024", "position 4 of s.bin")
    write_shard(str(tmp_path / "v_0.bin"), toks.numpy())
    _refused(lambda: checks.shard_token_ids("--val", "v", [str(tmp_path / "v_0.bin")], 1024), "--val", "65535")


def test_tokenizer_checks(tmp_path, shared_data):
    sp = os.path.join(shared_data, SP1024)
    info = checks.tokenizer("--tokenizer", sp, 1024)
    assert info["pieces"] == 1024 and len(info["sha256"]) == 64 and info["name"] == SP1024
    _refused(lambda: checks.tokenizer("--tokenizer", str(tmp_path / "none.model")), "--tokenizer", "not found")
    junk = tmp_path / "junk.model"
    junk.write_bytes(bytes(range(256)) * 8)
    _refused(lambda: checks.tokenizer("--tokenizer", str(junk)), "--tokenizer", "does not parse")
    _refused(lambda: checks.tokenizer("--tokenizer", sp, 512), "--tokenizer", "at most 512 pieces", "has 1024")
    other = checks.tokenizer("--tokenizer", os.path.join(shared_data, NO_FALLBACK))
    logs = []
    checks.tokenizer_identity("--tokenizer", sp, info, info, "--allow", False, log=logs.append)
    assert not logs
    _refused(lambda: checks.tokenizer_identity("--tokenizer", "o.model", other, info, "--allow", False),
             "--tokenizer", info["sha256"][:12], other["sha256"][:12], "--allow")
    checks.tokenizer_identity("--tokenizer", "o.model", other, info, "--allow", True, log=logs.append)
    assert len(logs) == 1 and "WARNING" in logs[0]
    checks.tokenizer_identity("--tokenizer", sp, info, None, "--allow", False, log=logs.append)
    assert len(logs) == 2 and "records no tokenizer" in logs[1]


# ------------------------------------------------------------------------------------------ never hang
def test_token_stream_never_spins_on_empty_shards(tmp_path):
    write_shard(str(tmp_path / "zero_0.bin"), [])
    write_shard(str(tmp_path / "zero_1.bin"), [])
    with Timer() as t:
        with pytest.raises(ShardError, match="hold 0 tokens"):
            DistributedTokenLoader(str(tmp_path / "zero_*.bin"))
    assert t.s < FAST_S
    # empty shards between non-empty ones are skipped; the stream wraps and keeps its order
    write_shard(str(tmp_path / "mix_0.bin"), [1, 2, 3])
    write_shard(str(tmp_path / "mix_1.bin"), [])
    write_shard(str(tmp_path / "mix_2.bin"), [4, 5])
    st = TokenStream(str(tmp_path / "mix_*.bin"))
    assert st.take(12).tolist() == [1, 2, 3, 4, 5] * 2 + [1, 2]
    # a stream whose shards were emptied after start-up raises instead of spinning
    write_shard(str(tmp_path / "mix_0.bin"), [])
    write_shard(str(tmp_path / "mix_2.bin"), [])
    with pytest.raises(ShardError, match="no progress"):
        st.take(100)


def test_loader_checks_ids_per_shard(tmp_path):
    write_shard(str(tmp_path / "t_0.bin"), [1, 2, 3, 4, 5])
    write_shard(str(tmp_path / "t_1.bin"), [1, 2, 65535, 4, 5])
    ld = DistributedTokenLoader(str(tmp_path / "t_*.bin"), vocab_size=1024)
    ld.next_batch(2, 2)  # 3 tokens from the first shard
    with pytest.raises(ShardError, match="t_1.bin: token id 65535 >= vocabulary size 1024"):
        ld.next_batch(4, 2)
    with pytest.raises(ShardError, match="65535"):
        DistributedTokenLoader(str(tmp_path / "t_1.bin"), vocab_size=1024)


# ------------------------------------------------------------------------------------------ container
def _frame(header: dict, blobs):
    """A container with valid checksums around an arbitrary (crafted) JSON header."""
    import zstandard

    from pgolf_kernels import quant as q
    from pgolf_kernels._ext import load_C

    C = load_C()
    payload = C.pack_payload(json.dumps(header).encode(), blobs)
    comp = zstandard.ZstdCompressor(level=3).compress(payload)
    head = q._OUTER.pack(q._OUTER_MAGIC, len(comp), len(payload), C.checksum64(payload), C.checksum64(comp), 0)
    return head[:40] + struct.pack("<Q", C.checksum64(head[:40])) + comp


def test_container_refuses_duplicate_and_overlapping_entries():
    from pgolf_kernels import quant as q

    a = torch.arange(16, dtype=torch.uint8)
    good = {"format": q._FORMAT, "version": q._FORMAT_VERSION, "meta": {},
            "entries": [{"name": "a", "kind": "t", "dtype": "uint8", "shape": [16], "nbytes": [16]},
                        {"name": "b", "kind": "t", "dtype": "uint8", "shape": [16], "nbytes": [16]}]}
    ents, _ = q.unpack_artifact(_frame(good, [a, a + 16]))
    assert ents["a"].tolist() == list(range(16)) and ents["b"].tolist() == list(range(16, 32))
    dup = json.loads(json.dumps(good))
    dup["entries"][1]["name"] = "a"
    with pytest.raises(q.ArtifactError, match="duplicate entry name 'a'"):
        q.unpack_artifact(_frame(dup, [a, a + 16]))
    # a negative size would move the cursor back onto entry a's bytes (b overlapping a)
    neg = json.loads(json.dumps(good))
    neg["entries"].insert(1, {"name": "back", "kind": "t", "dtype": "uint8", "shape": [-16], "nbytes": [-16]})
    with pytest.raises(q.ArtifactError, match="non-negative"):
        q.unpack_artifact(_frame(neg, [a, a + 16]))
    bad_shape = json.loads(json.dumps(good))
    bad_shape["entries"][1].update(shape=[-4, -4])
    with pytest.raises(q.ArtifactError, match="non-negative"):
        q.unpack_artifact(_frame(bad_shape, [a, a + 16]))


# ------------------------------------------------------------------------------------------ CLI
def test_run_cli_one_line_exit_2_and_debug_traceback(capsys):
    def main(argv):
        checks.int_range("--stride", 0, 1, 64)

    with pytest.raises(SystemExit) as ei:
        checks.run_cli(main, ["--stride", "0"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: --stride = 0: expected an integer in [1, 64]\n"
    with pytest.raises(CheckError):
        checks.run_cli(main, ["--stride", "0", "--debug"])

    def buggy(argv):
        raise KeyError("a bug, not an input error")

    with pytest.raises(KeyError):  # real bugs keep their traceback
        checks.run_cli(buggy, [])


def test_train_config_ranges_one_line(capsys):
    from train.config import parse_config

    for argv, arg in ((["--matrix-lr", "-1"], "--matrix-lr"), (["--iterations", "0"], "--iterations"),
                      (["--ema-decay", "1"], "--ema-decay"), (["--max-wallclock-seconds", "-5"], "--max-wallclock-seconds"),
                      (["--vocab-size", "70000"], "--vocab-size"), (["--num-heads", "3"], "--num-heads"),
                      (["--val-max-tokens", "10"], "--val-max-tokens"), (["--warmdown-frac", "1.5"], "--warmdown-frac")):
        with pytest.raises(SystemExit) as ei:
            parse_config(argv, env={}, cuda=False)
        assert ei.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"error: {arg} = " in err and "expected" in err, err


# ------------------------------------------------------------------------------------------ train driver
def _train_args(tmp_path, shared_data, **kw):
    shard = os.path.join(shared_data, SHARD)
    base = dict(preset="tiny", data_path=shard, val_path=shard, tokenizer_path=os.path.join(shared_data, SP1024),
                vocab_size=1024, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, seq_len=32,
                bigram_buckets=0, train_batch_tokens=256, max_micro_tokens=256, warmup_steps=0, iterations=2,
                log_every=1, val_batch_tokens=4096, val_max_tokens=4096, runs_dir=str(tmp_path), run_id="r",
                reference=1, max_wallclock_seconds=0, compile=0, qat_frac=0, artifact=0)
    base.update(kw)
    out = []
    for k, v in base.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


@pytest.mark.parametrize("case", ["zero_train", "short_val", "val_id", "train_id", "no_match", "bad_tok", "fixture_tok",
                                  "geometry"])
def test_train_driver_refuses_before_the_model_is_built(case, tmp_path, shared_data, monkeypatch):
    import train.train_gpt as tg

    built = []
    monkeypatch.setattr(tg, "build_model", lambda run: built.append(1))
    if case == "zero_train":
        write_shard(str(tmp_path / "zero_0.bin"), [])
        kw, arg, match = dict(data_path=str(tmp_path / "zero_*.bin")), "--data-path", ("holds 0 tokens",)
    elif case == "short_val":
        write_shard(str(tmp_path / "v_0.bin"), [1, 5, 6])
        kw, arg, match = dict(val_path=str(tmp_path / "v_0.bin"), val_max_tokens=0), "--val-path", ("at least 33",)
    elif case == "val_id":
        write_shard(str(tmp_path / "v_0.bin"), [1] + [5] * 40 + [65535])
        kw, arg, match = dict(val_path=str(tmp_path / "v_0.bin"), val_max_tokens=0), "--val-path", ("65535",)
    elif case == "train_id":
        write_shard(str(tmp_path / "t_0.bin"), [1] + [5] * 40 + [4096])
        kw, arg, match = dict(data_path=str(tmp_path / "t_0.bin")), "--data-path", ("token id 4096 >= vocabulary size 1024",)
    elif case == "no_match":
        kw, arg, match = dict(val_path=str(tmp_path / "nothing_*.bin")), "--val-path", ("matches no file",)
    elif case == "bad_tok":
        (tmp_path / "junk.model").write_bytes(b"not a sentencepiece model" * 10)
        kw, arg, match = dict(tokenizer_path=str(tmp_path / "junk.model")), "--tokenizer-path", ("does not parse",)
    elif case == "fixture_tok":  # refused before the fixture's tokenizer would be trained
        kw, arg, match = (dict(data_path="", val_path="", tokenizer_path=str(tmp_path / "none.model")),
                          "--tokenizer-path", ("not found",))
    elif case == "geometry":
        kw, arg, match = dict(train_batch_tokens=100), "--train-batch-tokens", ("multiple of",)
    argv = _train_args(tmp_path, shared_data, **kw)
    _refused(lambda: tg.main(argv), arg, *match)
    assert not built


def test_train_warm_eval_caches_starts_the_printed_eval_warmup(tmp_path, shared_data, capsys, monkeypatch):
    """--warm-eval-caches 1 on a CUDA run: the initial weights' artifact, then one background ``train.eval
    --warmup-only`` with the printed eval command's arguments (all but --artifact) on the run's device, without the
    launcher's rank variables, writing its compiles to <run_dir>/eval.compile-cache too; finish_eval_warmup waits for it
    and reports its warm-up and that file. Here the process is a stand-in
    (the CLI's --warmup-only is tested above); on a CPU run nothing starts, and it is off by default."""
    import types

    from train import train_gpt as tg
    from train.eval_fixtures import tiny_model

    seen = {}

    class FakeProc:
        pid = 4242

        def __init__(self, argv, **kw):
            seen.update(argv=argv, **kw)
            cache = argv[argv.index("--compile-cache") + 1]
            with open(argv[argv.index("--json") + 1], "w") as f:
                json.dump(dict(warmup_s=12.5, wall_s=20.0, compiled=True,
                               compile_cache_file=dict(path=cache, saved_bytes=1234, entries={})), f)

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(tg.subprocess, "Popen", FakeProc)
    monkeypatch.setenv("MASTER_PORT", "29999")  # a launcher variable the child must not inherit
    logs = []
    run = types.SimpleNamespace(cfg=types.SimpleNamespace(warm_eval_caches=True), master=True, cuda=True,
                                device=torch.device("cuda", 1), tok_path=os.path.join(shared_data, SP1024),
                                val_pattern="/v/val_*.bin", run_dir=str(tmp_path), base=tiny_model(seed=0),
                                tokenizer=None, log=logs.append)
    started = tg.start_eval_warmup(run)
    argv, printed = seen["argv"], shlex.split(tg.eval_command("A", run.val_pattern, run.tok_path))[3:]
    i = argv.index("--warmup-only")
    assert argv[1:3] == ["-m", "train.eval"] and argv[3:i][2:] == printed[2:] and os.path.isfile(argv[4])
    assert argv[argv.index("--device") + 1] == "cuda:1" and "MASTER_PORT" not in seen["env"]
    out = tg.finish_eval_warmup(run, started)
    assert out["rc"] == 0 and out["warmup_s"] == 12.5 and any("eval warm-up: done" in m for m in logs)
    # the same compiles in one file of the run folder, named in the log for an eval on a machine with empty caches
    assert argv[argv.index("--compile-cache") + 1] == os.path.join(str(tmp_path), "eval.compile-cache")
    assert out["compile_cache_file"]["saved_bytes"] == 1234 and "--compile-cache" in logs[-1]
    run.cuda, run.device = False, torch.device("cpu")
    assert tg.start_eval_warmup(run) is None and "CPU eval compiles nothing" in logs[-1]
    s = tg.main(_train_args(tmp_path, shared_data))  # default: off
    assert s["eval_warmup"] is None and "eval warm-up" not in capsys.readouterr().out


def test_train_run_rule_stop_reason_eval_command_and_tokenizer_identity(tmp_path, shared_data, capsys):
    """A 2-step run: stops on iterations (said so), EMA chosen by the fixed rule (log + summary), the
    artifact records the tokenizer, and the printed eval command runs as printed."""
    from train import eval as ev
    from train.artifact import load_artifact
    from train.train_gpt import main

    s = main(_train_args(tmp_path, shared_data, artifact=1, ema_decay=0.5))
    out = capsys.readouterr().out
    assert s["stop_reason"].startswith("iterations: 2 of --iterations 2") and "stop: iterations" in out
    assert s["weights"] == "ema" and "fixed rule" in s["weights_rule"] and "validation set never" in out
    sha = checks.file_sha256(os.path.join(shared_data, SP1024))
    _, _, meta = load_artifact(s["artifact"]["path"])
    assert meta["tokenizer"] == dict(sha256=sha, pieces=1024, name=SP1024)
    last = out.strip().splitlines()[-1].strip()
    assert last == s["eval_command"] and last.startswith("python3 -m train.eval --artifact ")
    argv = shlex.split(last)[3:] + ["--mode", "flat", "--max-docs", "3", "--device", "cpu", "--reference"]
    rep = ev.main(argv)
    assert rep["window"] == 32 and np.isfinite(rep["val_bpb"])  # default window = the trained seq_len
    # raw weights when EMA is off, by the same rule; a budget stop says so
    s2 = main(_train_args(tmp_path, shared_data, run_id="r2", ema_decay=0, iterations=10_000,
                          max_wallclock_seconds=0.5))
    assert s2["weights"] == "raw" and s2["stop_reason"].startswith("wall clock:") and s2["steps"] < 10_000


# ------------------------------------------------------------------------------------------ eval driver
@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory):
    """A tiny artifact (seq_len 64) that records the sp1024 tokenizer, and a val shard of 6 documents."""
    from train.artifact import save_artifact
    from train.eval_fixtures import doc_stream, tiny_model

    data = os.path.abspath(os.environ.get("PGOLF_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data")))
    if not os.path.isdir(data):
        pytest.skip(f"shared data not found at {data}")
    d = tmp_path_factory.mktemp("ev")
    tok = os.path.join(data, SP1024)
    m = tiny_model(seed=3, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1, seq_len=64)
    art = str(d / "tiny.ptz")
    save_artifact(m, art, code_paths=[], warn=False,
                  extra_meta=dict(tokenizer=checks.tokenizer("--tokenizer", tok, 1024)))
    val = str(d / "val_0.bin")
    write_shard(val, doc_stream([50, 80, 30, 120, 60, 40], seed=1).numpy())
    return dict(artifact=art, val=val, tok=tok, dir=d, data=data)


def _ev_argv(e, *extra):
    return ["--artifact", e["artifact"], "--val", e["val"], "--tokenizer", e["tok"], "--device", "cpu",
            "--reference"] + list(extra)


@pytest.mark.parametrize("extra,arg,match", [
    (["--mode", "sliding", "--stride", "0"], "--stride", ("[1, 64]",)),
    (["--mode", "sliding", "--stride", "65"], "--stride", ("[1, 64]",)),
    (["--window", "0"], "--window", ("[1, 64]",)),
    (["--window", "128"], "--window", ("trained sequence length 64",)),
    (["--chunk", "0"], "--chunk", ()),
    (["--share", "3/2"], "--share", ("0 <= k < n",)),
    (["--lr", "-1"], "--lr", ("> 0",)),
    (["--budget", "20", "--margin", "30"], "--budget", ()),
    (["--max-docs", "0"], "--max-docs", ()),
    (["--mode", "chunked", "--chunk-tokens", "1000"], "--chunk-tokens", ("[2048, 65536]",)),
    (["--mode", "chunked", "--train-len", "65"], "--train-len", ("64",)),
    (["--rank", "0"], "--rank", ()),
    (["--cuda-graphs"], "--cuda-graphs", ("on a CUDA device", "on cpu")),
    (["--cuda-graphs", "on"], "--cuda-graphs", ("on a CUDA device", "on cpu")),
    (["--graph-window-step", "96"], "--graph-window-step", ("the CUDA graphs are off",)),
    (["--graph-capture", "first-use"], "--graph-capture", ("the CUDA graphs are off",)),
    (["--graph-min-steps", "2"], "--graph-min-steps", ("the CUDA graphs are off",)),
])
def test_eval_refuses_bad_numbers_before_loading(eval_inputs, extra, arg, match):
    from train import eval as ev

    _refused(lambda: ev.main(_ev_argv(eval_inputs, *extra)), arg, *match)


@pytest.mark.parametrize("case", ["no_match", "empty_val", "val_id", "no_tok", "junk_tok", "mismatch",
                                  "bad_artifact"])
def test_eval_refuses_bad_inputs_before_warmup(eval_inputs, case, monkeypatch):
    from train import eval as ev

    e, d = dict(eval_inputs), eval_inputs["dir"]
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    if case == "no_match":
        e["val"], arg, match = str(d / "nothing_*.bin"), "--val", ("matches no file",)
    elif case == "empty_val":
        write_shard(str(d / "empty_0.bin"), [])
        e["val"], arg, match = str(d / "empty_0.bin"), "--val", ("holds 0 tokens",)
    elif case == "val_id":
        write_shard(str(d / "hi_0.bin"), [1, 5, 6, 65535, 7])
        e["val"], arg, match = str(d / "hi_0.bin"), "--val", ("id 65535", "vocabulary size 1024", "position 3")
    elif case == "no_tok":
        e["tok"], arg, match = str(d / "missing.model"), "--tokenizer", ("not found",)
    elif case == "junk_tok":
        (d / "junk.model").write_bytes(b"\x08\x01garbage" * 50)
        e["tok"], arg, match = str(d / "junk.model"), "--tokenizer", ("does not parse",)
    elif case == "mismatch":
        e["tok"] = os.path.join(e["data"], NO_FALLBACK)
        arg, match = "--tokenizer", ("training tokenizer " + SP1024, "--allow-tokenizer-mismatch")
    else:
        blob = bytearray(open(e["artifact"], "rb").read())
        blob[len(blob) // 2] ^= 0x5A
        (d / "bad.ptz").write_bytes(bytes(blob))
        e["artifact"], arg, match = str(d / "bad.ptz"), "--artifact", ("refused",)
    _refused(lambda: ev.main(_ev_argv(e)), arg, *match)


def test_eval_tokenizer_mismatch_override_and_cpu_warmup(eval_inputs, capsys):
    """--allow-tokenizer-mismatch scores anyway (saying so; this tokenizer then fails the byte-fallback
    check, a separate refusal); the default window is the model's seq_len; on CPU the per-document
    warm-up is skipped, with the reason logged."""
    from train import eval as ev
    from train.bpb import TokenizerError

    other = os.path.join(eval_inputs["data"], NO_FALLBACK)
    argv = ["--artifact", eval_inputs["artifact"], "--val", eval_inputs["val"], "--tokenizer", other,
            "--device", "cpu", "--reference", "--allow-tokenizer-mismatch"]
    with pytest.raises(TokenizerError):
        ev.main(argv)
    assert "tokenizer mismatch accepted by --allow-tokenizer-mismatch" in capsys.readouterr().out
    with Timer() as t:
        rep = ev.main(_ev_argv(eval_inputs, "--mode", "base", "--batch-size", "4", "--rank", "2"))
    out = capsys.readouterr().out
    assert "warm-up: skipped on CPU (nothing to compile or autotune)" in out and "fallback" in out
    assert rep["window"] == 64 and rep["chunk"] == 64 and rep["docs"] == 6 and np.isfinite(rep["val_bpb"])
    assert "warmup_rates" not in rep and rep["warmup_s"] < 2.0 and t.s < FAST_S
    # the load's parts, in order, account for the load up to the report's rounding
    parts = rep["load_parts"]
    assert list(parts) == ["checks", "model", "compile_setup", "tokenizer", "sync"]
    assert all(v >= 0 for v in parts.values()) and abs(sum(parts.values()) - rep["load_s"]) < 0.01


def test_eval_warmup_only_reads_no_val_and_warms(eval_inputs, capsys, monkeypatch):
    """--warmup-only: the warm-up runs (full, even on CPU) on synthetic tokens and the eval stops there: no
    validation shard is read (a --val that matches nothing is not even checked), nothing is scored; and
    --warmup-only with the warm-up off is refused by name."""
    from train import eval as ev

    monkeypatch.setattr(ev, "load_val_tokens", lambda *a, **k: pytest.fail("read the validation shards"))
    argv = ["--artifact", eval_inputs["artifact"], "--val", str(eval_inputs["dir"] / "none_*.bin"), "--tokenizer",
            eval_inputs["tok"], "--device", "cpu", "--reference", "--batch-size", "2", "--rank", "2", "--warmup-only"]
    rep = ev.main(argv)
    out = capsys.readouterr().out
    assert rep["warmup_only"] is True and "val_bpb" not in rep and "[eval] warm-up only:" in out
    assert rep["warmup_rates"]["ttt_pos_per_s"] > 0 and rep["warmup_rates"]["warm_shapes_s"] > 0
    with pytest.raises(SystemExit):
        ev.main(argv + ["--warmup", "off"])
    assert "--warmup-only: expected the warm-up on" in capsys.readouterr().err


def test_eval_precompiled_needs_the_compiled_forward(eval_inputs):
    """--precompiled with the forward not compiled (CPU, --compile auto) is refused by name before the artifact is
    decoded into a model."""
    from train import eval as ev

    _refused(lambda: ev.main(_ev_argv(eval_inputs, "--precompiled", str(eval_inputs["dir"] / "pc"))), "--precompiled",
             "the compiled forward")


def test_eval_cli_subprocess_one_line_and_debug(eval_inputs):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "train.eval"] + _ev_argv(eval_inputs, "--mode", "sliding", "--stride", "0")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == ["error: --stride = 0: expected an integer in [1, 64] (the sliding-window "
                                             "step, at most the window 64)"]
    r = subprocess.run(cmd + ["--debug"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr and "CheckError" in r.stderr


def test_cuda_graphs_auto_turns_on_only_where_measured_and_verified():
    """--cuda-graphs auto: on for per-document TTT on CUDA (--reference and the kernel path), off elsewhere, each
    with its reason."""
    from train.eval import _parse, auto_cuda_graphs

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for ref, why in [(True, "--reference"), (False, "kernel path")]:
        on, reason = auto_cuda_graphs(cuda, "ttt", ref)
        assert on and why in reason, (ref, reason)
    for dev, mode, ref, sep, why in [(cpu, "ttt", True, False, "CUDA only"), (cpu, "ttt", False, False, "CUDA only"),
                                     (cuda, "base", True, False, "--mode base"),
                                     (cuda, "base", False, False, "--mode base"),
                                     (cuda, "ttt", True, True, "--separate-score-pass"),
                                     (cuda, "ttt", False, True, "--separate-score-pass")]:
        on, reason = auto_cuda_graphs(dev, mode, ref, sep)
        assert not on and why in reason, (dev, mode, ref, sep, reason)
    assert auto_cuda_graphs("cpu", "ttt", True)[0] is False
    with pytest.raises(ValueError, match="auto_cuda_graphs: mode = 'tt'"):
        auto_cuda_graphs(cuda, "tt", True)
    with pytest.raises(RuntimeError):  # torch.device names the bad string itself
        auto_cuda_graphs("gpu0", "ttt", True)
    base = ["--artifact", "a", "--val", "v", "--tokenizer", "t"]
    assert _parse(base).cuda_graphs == "auto" and not _parse(base).ttt_cfg.cuda_graphs
    assert _parse(base + ["--cuda-graphs"]).ttt_cfg.cuda_graphs
    assert not _parse(base + ["--cuda-graphs", "off"]).ttt_cfg.cuda_graphs


@pytest.mark.parametrize("extra,window,chunk", [([], 64, 64), (["--recipe", "records"], 64, 48),
                                                (["--window", "32"], 32, 32), (["--mode", "sliding"], 64, 64)])
def test_eval_window_default_is_the_recipes_at_most_seq_len(eval_inputs, extra, window, chunk):
    """Per-document TTT takes the recipe's window (seeds 1024, records 2048), cut to the model's trained
    length (64 here, said in the log); --window overrides it; other modes use the trained length."""
    from train import eval as ev

    args = ev._parse(_ev_argv(eval_inputs, *extra))
    lines = []
    preset = ev.RECIPES[args.recipe]
    got = checks.eval_args(args, lines.append, recipe_window=preset.get("window"), recipe_chunk=preset.get("chunk", 256))
    assert got[:3] == (64, window, chunk)
    said = any("exceeds the model's trained length 64" in line for line in lines)
    assert said == ("--window" not in extra and "sliding" not in extra)


def test_eval_compile_cache_needs_the_compiled_forward_and_a_file_path(eval_inputs, tmp_path):
    """--compile-cache with the forward not compiled (CPU, --compile auto) is refused by name; so is a folder, with the
    forward compiled; both before the artifact is decoded into a model."""
    from train import eval as ev

    _refused(lambda: ev.main(_ev_argv(eval_inputs, "--compile-cache", str(tmp_path / "c.bin"))), "--compile-cache",
             "the compiled forward")
    _refused(lambda: ev.main(_ev_argv(eval_inputs, "--compile", "on", "--compile-cache", str(tmp_path))),
             "--compile-cache", "a file, not a folder")


def test_overlap_compile_process_child_runs_the_cli_warm_up_only(eval_inputs):
    """The child's arguments (this eval's, with --warmup-only and without --overlap-compile / --json / --max-docs) are
    a valid eval command line: the child runs the warm-up on synthetic tokens and exits 0."""
    import subprocess

    from train.eval import _compile_child_argv
    from train.eval_fixtures import tiny_model
    from train.overlap import ProcessCompile

    argv = _ev_argv(eval_inputs, "--overlap-compile", "process", "--compile", "off", "--json",
                    str(eval_inputs["dir"] / "r.json"), "--max-docs", "2")
    pc = ProcessCompile(tiny_model(seed=3), _compile_child_argv(argv), dict).start()
    rc = pc.child.proc.wait(timeout=300)
    pc.child._log.seek(0)
    assert rc == 0, (subprocess.list2cmdline(pc.cmd), pc.child._log.read()[-2000:])
    assert "--warmup-only" in pc.cmd and "--overlap-compile" not in pc.cmd
    assert not (eval_inputs["dir"] / "r.json").exists()


def test_eval_overlap_compile_refused_by_name_where_it_cannot_run(eval_inputs):
    """--overlap-compile without the compiled forward and CUDA graphs (a CPU run), or with the rolling schedule:
    one line naming the flag and every missing condition, before the artifact is decoded."""
    from train import eval as ev

    _refused(lambda: ev.main(_ev_argv(eval_inputs, "--overlap-compile")), "--overlap-compile",
             "the compiled forward", "--cuda-graphs on")
    _refused(lambda: ev.main(_ev_argv(eval_inputs, "--overlap-compile", "--schedule", "rolling", "--warmup", "off")),
             "--overlap-compile", "--schedule batch (got rolling)", "the warm-up on")
    _refused(lambda: ev.main(_ev_argv(eval_inputs, "--overlap-compile", "process")), "--overlap-compile",
             "the compiled forward", "--cuda-graphs on")


def test_parallel_compile_children_run_one_part_each(eval_inputs, tmp_path, capsys):
    """``--warmup-only --warmup-part P`` (what ``--parallel-compile`` starts, one child per part): the global pass or a
    few TTT steps on synthetic tokens, exit with its report; refused by name without ``--warmup-only`` (argparse),
    ``global`` without phases, ``ttt-tail`` without ``--tail-block`` and any part outside ``--mode ttt`` (before the
    artifact is read)."""
    import json

    from train import eval as ev

    small = ("--recipe", "records", "--window", "64", "--chunk", "16", "--global-seq-len", "64", "--warmup-only")
    for part, key in (("global", "global_warmup_s"), ("ttt-block", "ttt_steps_warmup_s"),
                      ("ttt-tail", "ttt_steps_warmup_s")):
        out = tmp_path / f"{part}.json"
        extra = ("--tail-block",) if part == "ttt-tail" else ()
        rep = ev.main(_ev_argv(eval_inputs, *small, *extra, "--warmup-part", part, "--json", str(out)))
        assert rep == json.loads(out.read_text()) and rep["warmup_only"] and rep["warmup_rates"][key] > 0, rep
    with pytest.raises(SystemExit):
        ev.main(_ev_argv(eval_inputs, "--recipe", "records", "--warmup-part", "global"))
    assert "--warmup-part global: expected --warmup-only" in capsys.readouterr().err
    _refused(lambda: ev.main(_ev_argv(eval_inputs, "--warmup-only", "--warmup-part", "global")), "--warmup-part",
             "a phased recipe")
    _refused(lambda: ev.main(_ev_argv(eval_inputs, *small, "--no-tail-block", "--warmup-part", "ttt-tail")),
             "--warmup-part", "--tail-block")
    _refused(lambda: ev.main(_ev_argv(eval_inputs, *small, "--mode", "base", "--warmup-part", "ttt-head")),
             "--warmup-part", "--mode ttt")


def test_parallel_compile_parts_only_where_it_pays():
    """auto: a phased TTT eval, compiled, on one CUDA device, the warm-up on, and none of the options that bring their
    own caches or run no eval: one child per TTT function (the tail block's with --tail-block) and one for the global
    pass; global: that one only; off, or anywhere else: none."""
    import argparse

    from train.eval import _parallel_compile_parts
    from train.ttt_config import TTTConfig

    base = dict(parallel_compile="auto", mode="ttt", warmup_only=False, no_warmup=False, warmup="auto",
                overlap_compile=None, compile_cache=None, precompiled=None)
    phased = TTTConfig(phases=3, phase_docs=6)

    def parts(**kw):
        return _parallel_compile_parts(argparse.Namespace(**dict(base, **kw.pop("a", {}))), kw.pop("cfg", phased),
                                       kw.pop("compiled", True), kw.pop("device", "cuda"), kw.pop("world", 1))

    assert parts() == ["ttt-block", "ttt-head", "global"]
    assert parts(cfg=TTTConfig(phases=3, phase_docs=6, tail_block=True)) == ["ttt-block", "ttt-head", "ttt-tail", "global"]
    assert parts(a=dict(parallel_compile="global"), cfg=TTTConfig(phases=3, phase_docs=6, tail_block=True)) == ["global"]
    assert parts(a=dict(parallel_compile="global"), cfg=TTTConfig()) == []  # no global pass without phases
    for kw in (dict(cfg=TTTConfig()), dict(compiled=False), dict(device="cpu"), dict(world=8),
               dict(a=dict(parallel_compile="off")), dict(a=dict(mode="base")), dict(a=dict(warmup_only=True)),
               dict(a=dict(warmup="off")), dict(a=dict(no_warmup=True)), dict(a=dict(overlap_compile="thread")),
               dict(a=dict(compile_cache="f")), dict(a=dict(precompiled="d"))):
        assert parts(**dict(kw)) == [], kw


def test_warmup_part_refuses_a_precompiled_folder(eval_inputs, tmp_path):
    """A --parallel-compile part compiles some functions; a precompiled folder holds all: refused by name, before the
    artifact is read."""
    from train import eval as ev

    _refused(lambda: ev.main(_ev_argv(eval_inputs, "--recipe", "records", "--warmup-only", "--warmup-part", "global",
                                      "--compile", "on", "--precompiled", str(tmp_path / "pc"))),
             "--warmup-part", "no --precompiled")
