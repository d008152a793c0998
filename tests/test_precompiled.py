"""train.precompiled: ahead-of-time compiled regional functions, saved by one process and loaded by the next
(CPU lane: Inductor's C++ backend, the same packaging the GPU uses)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from train import eval as ev
from train.eval_fixtures import doc_stream, synthetic_lut, tiny_model
from train.forward import compile_rows_nll
from train.precompiled import fingerprint, unsupported_reason
from train.ttt_config import TTTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = TTTConfig(rank=2, chunk=16, window=32, batch_size=3)
DOCS = [50, 30, 20]
# a fresh process: the same model and documents, the saved folder; prints what it loaded, compiled and traced
CHILD = """
import json, sys
from torch._dynamo.utils import counters
from train import eval as ev
from train.eval_fixtures import doc_stream, synthetic_lut, tiny_model
from train.forward import compile_rows_nll
from train.ttt_config import TTTConfig
m = tiny_model(seed=0, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1)
made = compile_rows_nll(m, precompiled=sys.argv[1])
rep = ev.evaluate(m, doc_stream([50, 30, 20], seed=4), synthetic_lut(1024), mode="ttt",
                  cfg=TTTConfig(rank=2, chunk=16, window=32, batch_size=3), backend="bmm")
print(json.dumps(dict(val_bpb=rep["val_bpb"], frames=int(counters["frames"].get("ok", 0)),
                      loaded=sum(p.stats["loaded"] for p in made.values()),
                      compiled=sum(p.stats["compiled"] for p in made.values()))))
"""


# torch 2.11 (the GPU lane's) cannot save compiled functions: the save/load tests need a torch that can
needs_aot = pytest.mark.skipif(bool(unsupported_reason()), reason=f"--precompiled: {unsupported_reason()}")


def _model():
    return tiny_model(seed=0, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1)


@needs_aot
def test_precompiled_saved_then_loaded_without_tracing(tmp_path):
    """First process: the TTT eval compiles its variants ahead of time into the folder, scoring as eager does.
    A fresh process on that folder loads every variant, traces nothing (0 Dynamo frames), compiles nothing and
    scores the same."""
    stream, lut = doc_stream(DOCS, seed=4), synthetic_lut(1024)
    m = _model()
    eager = ev.evaluate(m, stream, lut, mode="ttt", cfg=CFG, backend="bmm")
    folder = str(tmp_path / "precompiled")
    made = compile_rows_nll(m, precompiled=folder)
    try:
        comp = ev.evaluate(m, stream, lut, mode="ttt", cfg=CFG, backend="bmm")
    finally:
        compile_rows_nll(m, enable=False)
    assert made["block_adapted"].stats["compiled"] >= 1 and made["head_adapted"].stats["compiled"] >= 1
    assert comp["targets"] == eager["targets"] and comp["legality"]["multi"] == 0
    assert abs(comp["val_bpb"] - eager["val_bpb"]) < 1e-5 * eager["val_bpb"], (comp["val_bpb"], eager["val_bpb"])
    files = sorted(os.listdir(folder))
    assert files and all(f.endswith(".aot") for f in files), files
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", CHILD, folder], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["frames"] == 0 and rep["compiled"] == 0 and rep["loaded"] == len(files), rep
    assert abs(rep["val_bpb"] - comp["val_bpb"]) < 1e-6 * comp["val_bpb"], (rep, comp["val_bpb"])


def test_fingerprint_names_what_a_variant_was_made_for():
    a = tiny_model(seed=0, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1)
    b = tiny_model(seed=1, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1)
    c = tiny_model(seed=0, num_layers=1, model_dim=32, num_heads=4, num_kv_heads=1)
    assert fingerprint("block_adapted", a, "cpu") == fingerprint("block_adapted", b, "cpu")  # weights do not matter
    assert fingerprint("block_adapted", a, "cpu") != fingerprint("block_adapted", c, "cpu")  # the config does
    assert fingerprint("block_adapted", a, "cpu") != fingerprint("head_adapted", a, "cpu")
    assert fingerprint("block_adapted", a, "cpu") != fingerprint("block_adapted", a, torch.device("meta"))


def test_precompiled_refuses_a_non_folder():
    from train.precompiled import Precompiled

    with pytest.raises(ValueError, match="precompiled: folder = '': expected a folder path"):
        Precompiled(lambda x: x, "", "f", "k")


@needs_aot
def test_precompiled_names_an_unreadable_variant(tmp_path):
    from train.precompiled import Precompiled

    bad = tmp_path / "f-k-0.aot"
    bad.write_bytes(b"not a compiled function")
    with pytest.raises(RuntimeError, match=r"precompiled: .*f-k-0.aot could not be loaded .*delete it"):
        Precompiled(lambda x: x, str(tmp_path), "f", "k")


def test_fingerprint_and_precompiled_refuse_bad_arguments():
    from train.precompiled import Precompiled

    with pytest.raises(ValueError, match="fingerprint: name = ''"):
        fingerprint("", _model(), "cpu")
    with pytest.raises(TypeError, match="fingerprint: model must be a train.model.GPT"):
        fingerprint("block_adapted", torch.nn.Linear(2, 2), "cpu")
    with pytest.raises(TypeError, match="precompiled: fn must be callable"):
        Precompiled(3, "somewhere", "f", "k")


def test_precompiled_refused_by_name_on_a_torch_without_aot_compile(tmp_path, monkeypatch):
    """A torch that cannot save compiled functions: Precompiled refuses in one line naming what is missing,
    and the eval refuses --precompiled before it loads the artifact."""
    from train import precompiled as pc
    from train.checks import CheckError

    monkeypatch.setattr(pc, "unsupported_reason", lambda: "torch 2.11 lacks torch.compile(...).aot_compile")
    with pytest.raises(RuntimeError, match=r"precompiled: torch 2.11 lacks torch.compile\(...\).aot_compile; run "
                                           r"without --precompiled"):
        pc.Precompiled(lambda x: x, str(tmp_path), "f", "k")
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    argv = ["--artifact", str(tmp_path / "a.ptz"), "--val", str(tmp_path / "v.bin"), "--tokenizer", "t.model",
            "--device", "cpu", "--compile", "on", "--precompiled", str(tmp_path / "pre")]
    with pytest.raises(CheckError, match=r"--precompiled.*lacks torch.compile"):
        ev.main(argv)
