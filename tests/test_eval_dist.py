"""Two ranks (gloo, CPU processes) vs one: same BPB, every target scored once across ranks,
batches claimed dynamically through the torch.distributed store."""
import contextlib
import json
import os
import sys

import torch
import torch.multiprocessing as mp

from train.eval_fixtures import synthetic_lut

CHUNK, WINDOW, BS = 32, 96, 2
LENGTHS = [300, 50, 197, 1, 129, 64, 260, 5, 77, 140, 33, 410]


@contextlib.contextmanager
def _gloo_rank(rank, world, init_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank, world, init_file, out_dir):
    from train.eval import evaluate
    from train.eval_fixtures import doc_stream, tiny_model
    from train.ttt_config import TTTConfig

    with _gloo_rank(rank, world, init_file):
        m = tiny_model(seed=3)
        stream = doc_stream(LENGTHS, seed=5)
        cfg = TTTConfig(rank=4, chunk=CHUNK, window=WINDOW, batch_size=BS)
        claimed = []
        import train.doc_queue as dq

        real = dq.ttt_batch

        def spy(*a, **k):
            claimed.append(int(k["batch_index"]))
            return real(*a, **k)

        dq.ttt_batch = spy
        rep = evaluate(m, stream, synthetic_lut(), mode="ttt", cfg=cfg, backend="bmm", strict=True)
        rep["claimed"] = claimed
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(rep, f)


def test_two_ranks_same_bpb_as_one(tmp_path):
    from train.eval import evaluate
    from train.eval_fixtures import doc_stream, tiny_model
    from train.ttt_config import TTTConfig

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = tiny_model(seed=3)
        stream = doc_stream(LENGTHS, seed=5)
        one = evaluate(m, stream, synthetic_lut(), mode="ttt", cfg=TTTConfig(rank=4, chunk=CHUNK, window=WINDOW, batch_size=BS),
                       backend="bmm")
    finally:
        torch.set_num_threads(old)
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="forkserver")
    reps = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    for r in reps:  # all-reduced: every rank reports the global numbers
        assert r["world_size"] == 2
        assert r["targets"] == one["targets"] and r["bytes"] == one["bytes"]
        assert abs(r["val_bpb"] - one["val_bpb"]) <= 1e-9 * one["val_bpb"], (r["val_bpb"], one["val_bpb"])
        assert r["legality"]["missing"] == 0 and r["legality"]["multi"] == 0
    claimed = sorted(reps[0]["claimed"] + reps[1]["claimed"])
    n_batches = -(-sum(1 for L in LENGTHS if L > 0) // BS)
    assert claimed == list(range(n_batches))  # each batch claimed by exactly one rank
    assert reps[0]["docs_ttt"] == len(LENGTHS)


def _phased_cfg():
    from train.ttt_config import recipe

    # the records' phased recipe at tiny shapes; warm-start A off so that per-document scores do not depend
    # on which rank's adapter rows a document landed in (the global pass is what is compared here)
    return recipe("records", rank=4, alpha=6.0, chunk=CHUNK, window=WINDOW, batch_size=BS, phase_docs=8,
                  global_seq_len=64, global_chunk_tokens=256, global_batch_seqs=3, warm_start_a=False)


def _phased_worker(rank, world, init_file, out_dir):
    from train.eval import evaluate
    from train.eval_fixtures import doc_stream, tiny_model

    with _gloo_rank(rank, world, init_file):
        m = tiny_model(seed=3)
        rep = evaluate(m, doc_stream(LENGTHS, seed=5), synthetic_lut(), mode="ttt", cfg=_phased_cfg(), backend="bmm",
                       strict=True)
        torch.save(torch.cat([p.detach().reshape(-1) for p in m.parameters()]), os.path.join(out_dir, f"w{rank}.pt"))
        with open(os.path.join(out_dir, f"phased{rank}.json"), "w") as f:
            json.dump(rep, f)


def test_phased_two_ranks_same_base_and_bpb(tmp_path):
    """Phased TTT on 2 ranks: both ranks end with bit-identical base weights (the global-pass gradients
    are all-reduced), equal to the 1-rank weights up to summation order, and the BPB matches."""
    from train.eval import evaluate
    from train.eval_fixtures import doc_stream, tiny_model

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = tiny_model(seed=3)
        one = evaluate(m, doc_stream(LENGTHS, seed=5), synthetic_lut(), mode="ttt", cfg=_phased_cfg(), backend="bmm")
        w1 = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    finally:
        torch.set_num_threads(old)
    assert all(p["steps"] > 0 for p in one["phases"])
    assert not torch.equal(w1, torch.cat([p.detach().reshape(-1) for p in tiny_model(seed=3).parameters()]))
    mp.start_processes(_phased_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="forkserver")
    w = [torch.load(tmp_path / f"w{r}.pt") for r in range(2)]
    assert torch.equal(w[0], w[1])
    torch.testing.assert_close(w[0], w1, rtol=1e-4, atol=1e-6)
    reps = [json.load(open(tmp_path / f"phased{r}.json")) for r in range(2)]
    for r in reps:
        assert r["targets"] == one["targets"] and r["legality"]["global_unscored"] == 0
        assert abs(r["val_bpb"] - one["val_bpb"]) <= 1e-5 * one["val_bpb"], (r["val_bpb"], one["val_bpb"])
