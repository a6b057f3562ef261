"""Data-parallel training: identical masks on every rank; the trainer under torchrun (gloo, CPU)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _worker(rank, world, port, out, sync):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from sparselm.sparsity import SET, Schedule

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # seeds differ on purpose: only the broadcast from rank 0 can make the masks agree
    sp = SET(0.75, seed=rank, schedule=Schedule.of(40, update_every=5, end=1.0))
    if not sync:
        sp._sync_masks = lambda: None
    sp.attach(model, opt)
    g = torch.Generator().manual_seed(rank)
    for step in range(40):
        x = torch.randn(8, 16, generator=g)
        (ddp(x) - x).pow(2).mean().backward()
        sp.after_backward(step)
        opt.step()
        sp.after_step(step)
        opt.zero_grad()
    masks = [torch.cat([m.flatten() for m in sp.masks.values()]).to(torch.uint8)]
    gathered = [torch.zeros_like(masks[0]) for _ in range(world)]
    dist.all_gather(gathered, masks[0])
    if rank == 0:
        torch.save({"equal": all(torch.equal(gathered[0], t) for t in gathered[1:])}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("sync,expect_equal", [(True, True), (False, False)])
def test_masks_identical_on_every_rank(tmp_path, sync, expect_equal):
    out = tmp_path / "r.pt"
    port = 29500 + (os.getpid() % 1000) + (0 if sync else 1)
    mp.spawn(_worker, args=(2, port, str(out), sync), nprocs=2, join=True)
    assert torch.load(out)["equal"] is expect_equal


@pytest.mark.slow
def test_pretrain_under_torchrun_ddp(tmp_path, small_corpus, cache_dir):
    if shutil.which("torchrun") is None and not (os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun"))):
        pytest.fail("torchrun not found next to the Python interpreter")
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "ddp"
    env = dict(os.environ, SPARSELM_CACHE=str(cache_dir), OMP_NUM_THREADS="1")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "sparselm.cli.main", "pretrain", "--preset", "tiny",
           "--corpus", str(small_corpus), "--out", str(out), "--sparsity", "0.5", "--method", "rigl", "--max-steps", "12",
           "--batch-size", "4", "--device", "cpu", "--no-progress", "--set", "model.n_layer=2", "--set", "model.n_embd=32",
           "--set", "model.n_head=2", "--set", "model.vocab_size=512", "--set", "model.block_size=32",
           "--set", "optim.warmup_steps=2", "--set", "run.eval_every=6", "--set", "sparsity.update_every=4", "--set", "run.eval_batches=2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["tokens_seen"] == 12 * 4 * 32 * 2  # both ranks' tokens are counted
    assert summary["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-3)
