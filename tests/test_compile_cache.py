"""pgolf_kernels.compile_cache (the eval's ``--compile-cache FILE``, the patch's ``compile_cache=``): one process
writes torch.compile's caches to a file, a process with empty cache folders loads it and compiles from cache hits,
scoring the same; bad paths and foreign files are refused by name."""
import json
import os
import subprocess
import sys

import pytest

from pgolf_kernels.compile_cache import CompileCacheError, check_compile_cache_path, load_compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one process: load the file if it exists, compile the tiny model's regions, a TTT eval, write the file if it did not
CHILD = """
import json, sys
from torch._dynamo.utils import counters
from train import eval as ev
from pgolf_kernels.compile_cache import check_compile_cache_path, load_compile_cache, save_compile_cache
from train.eval_fixtures import doc_stream, synthetic_lut, tiny_model
from train.forward import compile_rows_nll
from train.ttt_config import TTTConfig
path = sys.argv[1]
existed = check_compile_cache_path(path)
loaded = load_compile_cache(path) if existed else None
m = tiny_model(seed=0, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1)
compile_rows_nll(m)
rep = ev.evaluate(m, doc_stream([30, 20], seed=4), synthetic_lut(1024), mode="ttt",
                  cfg=TTTConfig(rank=2, chunk=16, window=32, batch_size=2), backend="bmm")
saved = None if existed else save_compile_cache(path)
print(json.dumps(dict(val_bpb=rep["val_bpb"], loaded=loaded, saved=saved,
                      fx=dict(counters["inductor"]), aot=dict(counters["aot_autograd"]))))
"""


def _child(path, cache_dir):
    env = dict(os.environ, PYTHONPATH=ROOT, TORCHINDUCTOR_CACHE_DIR=str(cache_dir))
    r = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_written_then_loaded_by_a_process_with_empty_caches(tmp_path):
    """The first process (empty caches) misses, compiles and writes the file; a second process with other, empty cache
    folders loads it before compiling: every FX graph and AOTAutograd entry is a hit, nothing is compiled anew, and
    the score is the same to the last bit."""
    path = tmp_path / "eval.compile-cache"
    first = _child(path, tmp_path / "caches-a")
    assert first["loaded"] is None and first["saved"]["saved_bytes"] > 0 and path.is_file()
    assert first["fx"].get("fxgraph_cache_miss", 0) >= 1 and first["fx"].get("fxgraph_cache_hit", 0) == 0
    assert first["saved"]["entries"].get("inductor", 0) == first["fx"]["fxgraph_cache_miss"]
    second = _child(path, tmp_path / "caches-b")
    assert second["saved"] is None and second["loaded"]["loaded_bytes"] == path.stat().st_size
    assert second["fx"].get("fxgraph_cache_miss", 0) == 0, second["fx"]
    assert second["fx"].get("fxgraph_cache_hit", 0) == first["fx"]["fxgraph_cache_miss"]
    assert second["aot"].get("autograd_cache_miss", 0) == 0, second["aot"]
    assert second["val_bpb"] == first["val_bpb"]


def test_paths_refused_by_name(tmp_path):
    (tmp_path / "empty.bin").write_bytes(b"")
    cases = [
        (str(tmp_path), "a file, not a folder"),
        (str(tmp_path / "empty.bin"), "this one is empty"),
        (str(tmp_path / "no-such-folder" / "f.bin"), "a path in an existing folder"),
        ("", "a file path"),
        (3, "a file path"),
    ]
    for path, match in cases:
        with pytest.raises(CompileCacheError, match="^--compile-cache = ") as e:
            check_compile_cache_path(path, "--compile-cache")
        assert match in str(e.value), (path, str(e.value))
    assert check_compile_cache_path(str(tmp_path / "new.bin")) is False
    (tmp_path / "old.bin").write_bytes(b"x")
    assert check_compile_cache_path(str(tmp_path / "old.bin")) is True


def test_a_foreign_file_is_refused_by_name(tmp_path):
    bad = tmp_path / "not-a-cache.bin"
    bad.write_bytes(b"PGOLFZ" + bytes(range(200)))
    with pytest.raises(CompileCacheError, match=r"^compile_cache = .*not-a-cache.bin.*: expected a compile-cache file"):
        load_compile_cache(str(bad))


def test_load_and_save_refuse_a_bad_path_by_name(tmp_path):
    from pgolf_kernels.compile_cache import save_compile_cache

    with pytest.raises(CompileCacheError, match=r"^--compile-cache = .*missing.bin.*: expected an existing"):
        load_compile_cache(str(tmp_path / "missing.bin"), "--compile-cache")
    with pytest.raises(CompileCacheError, match=r"^compile_cache = .*: expected a file, not a folder"):
        save_compile_cache(str(tmp_path))
