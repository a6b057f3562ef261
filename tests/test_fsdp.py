"""FSDP2 on 2 CPU ranks (gloo): the same training as DDP and as one process, masks sharded like
their weights, and distributed checkpoints that resume on 1 or 2 ranks."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")


def _pretrain(out, ranks: int, *flags, corpus, cache_dir, steps=50, accum=1, batch=4, timeout=600):
    """``sparselm pretrain`` of the tiny preset on ``ranks`` processes (torchrun when > 1)."""
    launcher = [TORCHRUN, "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else [sys.executable]
    cmd = [*launcher, "-m", "sparselm.cli.main", "pretrain", "--preset", "tiny", "--corpus", str(corpus), "--out", str(out),
           "--max-steps", str(steps), "--batch-size", str(batch), "--grad-accum", str(accum), "--device", "cpu", "--no-progress",
           "--set", "model.vocab_size=512", "--set", "model.block_size=64", "--set", "optim.warmup_steps=5",
           "--set", "run.eval_every=50", "--set", "run.eval_batches=2", "--set", "run.log_every=1", "--keep-checkpoint", *flags]
    env = dict(os.environ, SPARSELM_CACHE=str(cache_dir), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


def _losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


METHODS = {"static": ["--sparsity", "0.75"],
           "rigl": ["--sparsity", "0.75", "--method", "rigl", "--set", "sparsity.update_every=10"]}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fsdp_trains_as_ddp_and_one_process(tmp_path, small_corpus, cache_dir, method):
    """50 steps of the tiny preset at 75%: FSDP and DDP on 2 ranks (2 micro-batches each) give the
    same loss curve within 1e-4, and both the same masks as one process reading the same data
    (4 micro-batches)."""
    runs = {}
    for name, ranks, accum, parallel in (("one", 1, 4, "ddp"), ("ddp", 2, 2, "ddp"), ("fsdp", 2, 2, "fsdp")):
        runs[name] = tmp_path / name
        _pretrain(runs[name], ranks, "--parallel", parallel, *METHODS[method], "--set", "run.ckpt_every=50",
                  corpus=small_corpus, cache_dir=cache_dir, accum=accum, batch=2)
    curves = {name: _losses(run) for name, run in runs.items()}
    assert sorted(curves["fsdp"]) == list(range(1, 51))
    for name in ("ddp", "one"):
        assert max(abs(curves["fsdp"][s] - curves[name][s]) for s in range(1, 51)) <= 1e-4, name
    masks = {name: load_file(str(run / "masks.safetensors")) for name, run in runs.items()}
    assert set(masks["fsdp"]) == set(masks["one"]) and len(masks["one"]) == 16  # 4 blocks x 4 linears
    for name in ("ddp", "fsdp"):
        for layer, mask in masks["one"].items():
            assert torch.equal(masks[name][layer], mask), (name, layer)
    summary, alone = (json.loads((runs[n] / "summary.json").read_text()) for n in ("fsdp", "one"))
    assert summary["world_size"] == 2 and summary["sparsity"]["measured"] == pytest.approx(0.75, abs=1e-4)
    for key in ("measured", "masked_params", "nonzero_masked_params", "layers"):  # counted over all shards
        assert summary["sparsity"][key] == alone["sparsity"][key], key
    # the final directory is a plain Hugging Face model, whole, with the same weights as DDP's
    fsdp_w, ddp_w = (load_file(str(runs[n] / "model.safetensors")) for n in ("fsdp", "ddp"))
    assert sorted(fsdp_w) == sorted(ddp_w)
    assert max(float((fsdp_w[k] - ddp_w[k]).abs().max()) for k in ddp_w) < 1e-4


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_one_and_two_ranks(tmp_path, small_corpus, cache_dir):
    """A run saved by FSDP on 2 ranks (torch.distributed.checkpoint shards) resumes on 2 ranks and
    on 1 process (grad_accum 2: the same global batch) with the same next losses, RigL included."""
    flags = ["--parallel", "fsdp", "--sparsity", "0.75", "--method", "rigl", "--set", "sparsity.update_every=4"]
    saved = tmp_path / "two"
    _pretrain(saved, 2, *flags, "--set", "run.ckpt_every=8", corpus=small_corpus, cache_dir=cache_dir, steps=8)
    assert (saved / "checkpoint" / "dcp" / ".metadata").exists()
    one = tmp_path / "one"
    shutil.copytree(saved, one)
    _pretrain(saved, 2, *flags, "--resume", corpus=small_corpus, cache_dir=cache_dir, steps=16)
    done = _pretrain(one, 1, *flags, "--resume", corpus=small_corpus, cache_dir=cache_dir, steps=16, accum=2)
    assert "resumed from" in done.stdout + done.stderr
    a, b = _losses(saved), _losses(one)
    assert sorted(a) == sorted(b) == list(range(1, 17))  # each step once: rows after the checkpoint were dropped
    for step in range(9, 17):
        assert abs(a[step] - b[step]) <= 1e-4, step
    ma, mb = load_file(str(saved / "masks.safetensors")), load_file(str(one / "masks.safetensors"))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


# ---- sharded masks, in-process on a 2-rank CPU mesh ----------------------------------------------
def _sharded_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from sparselm.sparsity import GMP, SET, RigL, Schedule, Static, sharding

    gathers = []
    real_full = sharding.full
    sharding.full = lambda t: (gathers.append(1), real_full(t))[1]
    results = {}
    mesh = init_device_mesh("cpu", (world,))
    for name, cls, extra in (("static", Static, {}), ("gmp", GMP, {}), ("set", SET, {}), ("rigl", RigL, {}),
                             ("2:4", Static, {"n_m": (2, 4)})):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
        reference = [p.detach().clone() for p in model.parameters()]
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        kw = {} if cls is Static else {"schedule": Schedule.of(20, update_every=5, start=0.0, end=0.8)}
        sp = cls(0.75, include=["*"], exclude=[], **kw, **extra).attach(model, opt)
        placed = all(isinstance(m, DTensor) and m.placements == t.param.placements and m.to_local().shape == t.param.to_local().shape
                     for t, m in ((t, sp.masks[t.name]) for t in sp.targets))
        g = torch.Generator().manual_seed(rank)
        per_step = []
        for step in range(20):
            x = torch.randn(8, 16, generator=g)
            (model(x) - x).pow(2).mean().backward()
            before = len(gathers)
            sp.after_backward(step)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sp.after_step(step)
            opt.zero_grad()
            per_step.append(len(gathers) - before)
        sp.check()
        full_masks = sp.state_dict()
        zeros_ok = all(bool((real_full(t.param.detach())[~full_masks[t.name]] == 0).all()) for t in sp.targets)
        results[name] = {
            "placed": placed, "zeros_ok": zeros_ok, "sparsity": [1 - float(m.float().mean()) for m in full_masks.values()],
            "gather_steps": [s for s, n in enumerate(per_step) if n],
            "update_steps": [s for s in range(20) if sp.is_update_step(s)],
            "report": sp.report()["measured"],
            "two_of_four": all(bool((m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all()) for m in full_masks.values()),
        }
        del reference
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_sharded_masks_follow_their_parameters(tmp_path):
    """Under FSDP2 every method (static, GMP, SET, RigL, N:M) keeps masks as DTensors placed like
    their weights, keeps exact per-layer sparsity, zeroes pruned weights on each rank's shard, and
    gathers whole tensors only on mask-update steps (never on the hot path)."""
    out = tmp_path / "r.pt"
    mp.spawn(_sharded_worker, args=(2, 29400 + os.getpid() % 500, str(out)), nprocs=2, join=True)
    results = torch.load(out)
    for name, r in results.items():
        target = 0.5 if name == "2:4" else 0.75
        assert r["placed"] and r["zeros_ok"], name
        assert r["sparsity"] == [target] * 2, name  # exactly round(s * 512) zeros in each layer
        assert r["report"] == pytest.approx(target, abs=1e-6)
        assert r["gather_steps"] == r["update_steps"], name
    assert results["2:4"]["two_of_four"]  # 2 kept in every group of 4 inputs, across the shards
    assert results["static"]["update_steps"] == [] and results["rigl"]["update_steps"] == [5, 10, 15]


def _full_model_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from sparselm.models import build_model, get_preset
    from sparselm.training.distributed import Dist, full_model, shard_model

    results = {}
    x = torch.randint(0, 256, (2, 16))
    for preset in ("tiny", "llama-tiny"):
        torch.manual_seed(0)
        model = build_model(get_preset(preset).override(n_layer=2, vocab_size=256, block_size=16)).eval()
        want = model(input_ids=x).logits.detach()
        shard_model(model, torch.device("cpu"), "auto", Dist(rank, world, rank))
        copy = full_model(model)
        if rank == 0:
            tied = copy.config.tie_word_embeddings and copy.lm_head.weight is copy.get_input_embeddings().weight
            results[preset] = {"equal": torch.allclose(copy(input_ids=x).logits, want, atol=1e-6),
                               "tied": tied or not copy.config.tie_word_embeddings}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_full_model_of_a_sharded_model_runs_like_the_original(tmp_path):
    """What a finished FSDP run saves: the gathered copy computes the original logits (GPT-2 with tied
    embeddings, Llama with its rotary buffers, which no state dict carries)."""
    out = tmp_path / "r.pt"
    mp.spawn(_full_model_worker, args=(2, 29900 + os.getpid() % 90, str(out)), nprocs=2, join=True)
    results = torch.load(out)
    assert results == {"tiny": {"equal": True, "tied": True}, "llama-tiny": {"equal": True, "tied": True}}
