"""Two test lanes.

* CPU lane (CI, no GPU): Triton kernels run under the interpreter. TRITON_INTERPRET must be
  set *before* any @triton.jit function is decorated, so it is set here, before test modules
  import pgolf_kernels' kernel modules. bf16 is broken in triton 3.6's interpreter
  (tl.dot on bf16 and int8->bf16 casts return garbage), so CPU-lane kernel tests use fp16/fp32;
  bf16 paths are covered on the GPU lane.
* GPU lane (``pytest -m gpu``): real shapes on a CUDA device; skipped with a stated reason
  when CUDA is absent.

Fixtures: ``device`` ("cuda" when present, else "cpu" = interpreter), ``act_dtype``
(the activation dtypes a kernel test may use on that device) and ``steps_match`` (an optimizer
against its torch reference on the same gradients).
"""
import os
import random
import zlib

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # One intra-op thread for the whole CPU lane (and, through the environment, for the subprocesses that
    # tests start): its tensors are tiny, and on the 2 shared CI cores torch's second thread spun against
    # other processes -- the tiny training run took 91 s with 2 threads, 6 s with 1 (load ~4, measured).
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import multiprocessing  # noqa: E402

import pytest  # noqa: E402

# The 2-rank gloo tests start their ranks with start_method="forkserver": each rank is forked from one server
# process per test session that imported these modules once, instead of a fresh interpreter importing torch
# (~3.5 s of CPU per rank, 8 ranks in the CPU lane). The server is a plain single-threaded process (no CUDA, no
# thread pool yet), so forking it is safe; a module that fails to import here is imported by the rank itself.
multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "torch.multiprocessing", "numpy",
                                        "train.eval", "pgolf_kernels.muon", "pgolf_kernels.patch"])

DEVICE = "cuda" if HAS_CUDA else "cpu"
# dtypes that the interpreter computes correctly; bf16 only on a real GPU
ACT_DTYPES = [torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float16]

SHARED_DATA = os.environ.get(
    "PGOLF_SHARED_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
)


# Whole CPU-lane suite (``python3 -m pytest -q``, the CI command): 2 pytest-xdist workers, one test file per
# worker at a time (module fixtures such as the shared interpreted kernel run stay computed once). Measured on
# the 2-core CI machine (load ~1.5): 420 s serial, 250 s with 2 workers. Serial, as before, when tests are named
# on the command line (a developer's targeted run), when -n / -p no:xdist is given, on a CUDA host (GPU-lane tests
# share the one GPU and time it), or when pytest-xdist is not installed.
XDIST_WORKERS = 2


def _parallel_cpu_suite(config):
    if HAS_CUDA or hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("xdist"):
        return
    if config.option.numprocesses is not None or config.option.dist != "no":
        return  # the command line chose
    if config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return
    if config.getoption("collectonly") or config.getoption("usepdb"):
        return
    config.option.numprocesses = XDIST_WORKERS
    config.option.dist = "loadfile"
    config.option.tx = ["popen"] * XDIST_WORKERS
    # files go to the workers in collection order (HEAVY_FIRST below), not xdist's default of most tests first
    config.option.loadscopereorder = False


# The CPU lane's slowest files, slowest first (summed seconds per file on the 2-core host, `--durations=0`, both
# workers busy): handed out first, so the last file a worker takes is a short one. With xdist's default order
# (files with the most tests first) the 165 s of test_patch.py came late: the suite's wall was 714 s for 1,254 s of
# summed test time on two workers, ~87 s of it one worker idle. A file missing here only runs later; none is skipped.
HEAVY_FIRST = ["test_patch.py",           # 165 s
               "test_lora.py",            # 125 s
               "test_code_pack.py",       # 108 s
               "test_fused_residual.py",  # 104 s
               "test_newton_schulz.py",   # 81 s
               "test_compile_cache.py",   # 78 s
               "test_eval_driver.py",     # 74 s
               "test_fused_qk.py",        # 43 s
               "test_bench_harness.py"]   # 39 s


def _heavy_first(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    # a stable sort: within a file, and among the files not listed, pytest's own order stays
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))


@pytest.hookimpl(tryfirst=True)  # before xdist's own (trylast) pytest_configure starts the workers
def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (GPU lane: pytest -m gpu)")
    config.addinivalue_line("markers", "slow: long-running CPU test")
    _parallel_cpu_suite(config)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    _heavy_first(items)
    skip = pytest.mark.skip(reason="GPU lane: no CUDA device on this machine (run `pytest -m gpu` on an H100/H200)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_SEED_CALLS: dict = {}  # test node id -> (base seed, draws so far)


def run_sm90_check(code: str) -> str:
    """Run ``code`` (Python using ``pgolf_kernels.sm90_check``) in a fresh process without TRITON_INTERPRET (the
    interpreter replaces the compiler): the CPU lane's compile check of GPU kernels for sm_90a. Skips when Triton's
    bundled ptxas is missing; fails with the child's stderr when the code does. Returns its stdout."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if "ptxas" in out.stderr and "No such file" in out.stderr:
        pytest.skip("triton's bundled ptxas is missing on this machine")
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def draw_seed() -> int:
    """The seed of a test's next random draw: the test's base seed for its first draw, then one derived from the
    base and the draw's index, so draws within a test are independent of each other and every run of the test draws
    the same inputs (a failure reproduces by re-running it). The base comes from the running test's node id;
    ``PGOLF_TEST_SEED=<int>`` sets another base, ``PGOLF_TEST_SEED=random`` a fresh one per test (a property-style
    sweep). The base is printed at the test's first draw (``-s`` shows it): ``PGOLF_TEST_SEED=<it>`` replays the
    test."""
    node = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    if node not in _SEED_CALLS:
        env = os.environ.get("PGOLF_TEST_SEED", "")
        if env == "random":
            base = random.randrange(2**31)
        elif env:
            base = int(env)
        else:
            base = zlib.crc32(node.encode()) & 0x7FFFFFFF
        print(f"seed={base}")
        _SEED_CALLS[node] = (base, 0)
    base, k = _SEED_CALLS[node]
    _SEED_CALLS[node] = (base, k + 1)
    return base if k == 0 else zlib.crc32(f"{base}#{k}".encode()) & 0x7FFFFFFF


@pytest.fixture(autouse=True)
def _seed_from_test_id(request):
    """Every test starts from a seed derived from its node id: an unseeded draw (torch.randint for lengths, a
    default seed) is the same on every run of that test, so a failure reproduces by re-running it."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=ACT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def act_dtype(request):
    return request.param


@pytest.fixture
def shared_data():
    """Path to ../shared/data (or $PGOLF_SHARED_DATA); skips with a reason when absent."""
    path = os.path.abspath(SHARED_DATA)
    if not os.path.isdir(path):
        pytest.skip(f"shared data not found at {path} (set PGOLF_SHARED_DATA to the shared/data folder)")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Single intra-op thread for modules of many tiny-model steps: on 2 shared cores torch's
    threads spun against other processes and made those tests ~30x slower (measured here)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def lut():
    """Byte LUT needing no tokenizer file (train.eval_fixtures.synthetic_lut): ids 0-3 control,
    4-259 one byte, the rest 1-4 bytes with every 3rd id carrying a leading space."""
    from train.eval_fixtures import synthetic_lut

    return synthetic_lut()


def _steps_match(ours, ref, params, ref_params, g, steps=4):
    """``steps`` optimizer steps of ``ours`` on ``params`` and of ``ref`` on ``ref_params`` (equal at the start),
    each on the same gradients drawn from generator ``g``; the parameters must agree after every step."""
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for a, b, gr in zip(params, ref_params, grads):
            a.grad, b.grad = gr.clone(), gr.clone()
        ours.step()
        ref.step()
        for a, b in zip(params, ref_params):
            torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)


@pytest.fixture
def steps_match():
    """``steps_match(ours, ref, params, ref_params, g, steps=4)``: see ``_steps_match``."""
    return _steps_match


def torch_references(monkeypatch) -> None:
    """The package's ops on their torch references for one test on a CPU (TRITON_INTERPRET=0, restored after it), every
    kernel module imported first. Why first: @triton.jit reads TRITON_INTERPRET when a module is imported, so a module
    imported while it is 0 keeps kernels that need a GPU driver for the rest of the process, and a later test of the
    same xdist worker that runs them under the interpreter failed with "0 active drivers"."""
    import importlib
    import pkgutil

    import pgolf_kernels

    for m in pkgutil.iter_modules(pgolf_kernels.__path__):
        importlib.import_module(f"pgolf_kernels.{m.name}")
    monkeypatch.setenv("TRITON_INTERPRET", "0")


class BenchSmoke:
    """Stand-ins for a bench's CPU-lane smoke run (the GPU runs the bench itself): ``timer`` and ``graph_timer`` run
    their function once, record its result in ``calls`` / ``graph_calls`` and report 1.0 / 0.5 ms; ``compile`` returns
    the function as given. Skips the test unless this is the CPU lane with the Triton interpreter."""

    def __init__(self):
        from pgolf_kernels import _utils

        if DEVICE != "cpu" or not _utils.interpret_mode():
            pytest.skip("the CPU lane's smoke run of the bench (the GPU runs the bench itself)")
        self.calls, self.graph_calls = [], []

    def timer(self, f):
        self.calls.append(f())
        return 1.0

    def graph_timer(self, f):
        self.graph_calls.append(f())
        return 0.5

    @staticmethod
    def compile(f, **kw):
        return f
