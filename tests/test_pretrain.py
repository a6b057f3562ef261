"""The pre-training loop: run directory, exact resume, FLOP totals, CLI."""

import importlib
import json

import pytest
import torch
from safetensors.torch import load_file

from sparselm import flops
from sparselm.cli.main import main
from sparselm.training import RunExistsError, pretrain

loop_module = importlib.import_module("sparselm.training.loop")


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sparse_run_directory_and_summary(micro_config, tmp_path):
    cfg = micro_config(sparsity=0.75)
    summary = pretrain(cfg, progress=False, log=lambda *_: None)
    run = tmp_path / "run"
    for name in ("config.json", "model.safetensors", "masks.safetensors", "metrics.jsonl", "summary.json",
                 "tokenizer.json", "tokenizer_config.json", "train_config.json"):
        assert (run / name).exists(), name
    assert summary["sparsity"]["target"] == 0.75
    assert summary["sparsity"]["measured"] == pytest.approx(0.75, abs=1e-3)
    assert len(summary["sparsity"]["layers"]) == 4 * cfg.shape().n_layer
    assert summary["tokens_seen"] == 20 * 8 * 32
    # FLOPs: every step at 25% density on the block linears
    shape = cfg.shape()
    assert summary["train_flops"] == pytest.approx(summary["tokens_seen"] * flops.train_flops_per_token(shape, 0.25), rel=1e-3)
    assert summary["dense_train_flops"] == pytest.approx(summary["tokens_seen"] * flops.train_flops_per_token(shape, 1.0))
    # saved weights really are sparse, and masks match them
    weights = load_file(str(run / "model.safetensors"))
    masks = load_file(str(run / "masks.safetensors"))
    for name, mask in masks.items():
        assert torch.count_nonzero(weights[name][~mask]) == 0
    # the run directory is a Hugging Face model directory
    from transformers import AutoTokenizer, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(run)
    tok = AutoTokenizer.from_pretrained(run)
    assert model.config.n_layer == 2 and tok.eos_token_id == model.config.eos_token_id
    with pytest.raises(RunExistsError):
        pretrain(cfg, progress=False, log=lambda *_: None)


METHOD_OPTIONS = {
    "static": {},
    "gmp": dict(start=0.2, end=0.8, update_every=3),
    "rigl": dict(update_every=3, end=0.9),
}


@pytest.mark.parametrize("method", ["static", "gmp", "rigl"])
def test_resume_after_crash_equals_uninterrupted(micro_config, tmp_path, monkeypatch, method):
    opts = dict(sparsity=0.5, method=method, **METHOD_OPTIONS[method])
    full = micro_config(out=str(tmp_path / "full"), **opts)
    pretrain(full, progress=False, log=lambda *_: None)

    real_save = loop_module.save_checkpoint

    def crash_after_first_checkpoint(run_dir, model, optimizer, masks, state):
        path = real_save(run_dir, model, optimizer, masks, state)
        if state["step"] == 10:
            raise RuntimeError("simulated crash")
        return path

    crashed = micro_config(out=str(tmp_path / "crashed"), **opts)
    monkeypatch.setattr(loop_module, "save_checkpoint", crash_after_first_checkpoint)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(crashed, progress=False, log=lambda *_: None)
    monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
    assert not (tmp_path / "crashed" / "summary.json").exists()
    pretrain(crashed, resume=True, progress=False, log=lambda *_: None)

    a, b = tmp_path / "full", tmp_path / "crashed"
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = load_file(str(a / "masks.safetensors")), load_file(str(b / "masks.safetensors"))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    losses_a = {r["step"]: r["loss"] for r in read_metrics(a) if "loss" in r}
    losses_b = {r["step"]: r["loss"] for r in read_metrics(b) if "loss" in r}
    assert losses_a == losses_b  # includes step 11, the first after the resume
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["final_val_loss"] == sb["final_val_loss"] and sa["train_flops"] == sb["train_flops"]


def test_resume_refuses_a_changed_config(micro_config, tmp_path):
    pretrain(micro_config(sparsity=0.5), progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="config differs .*sparsity"):
        pretrain(micro_config(sparsity=0.75), resume=True, progress=False, log=lambda *_: None)


@pytest.mark.slow
def test_cli_end_to_end(small_corpus, cache_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPARSELM_CACHE", str(cache_dir))
    out = tmp_path / "cli-run"
    rc = main(["pretrain", "--preset", "tiny", "--sparsity", "0.75", "--distribution", "erk", "--corpus", str(small_corpus),
               "--out", str(out), "--max-steps", "120", "--batch-size", "16", "--no-progress",
               "--set", "model.n_layer=2", "--set", "model.vocab_size=512", "--set", "model.block_size=64",
               "--set", "run.eval_every=60", "--set", "optim.warmup_steps=5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "done: val loss" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sparsity"]["distribution"] == "erk"
    vals = [r["val_loss"] for r in read_metrics(out) if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0]
    assert summary["final_val_loss"] < summary["unigram_entropy"]  # it learned context, not just frequencies
    assert main(["flops", "--preset", "gpt3-xl", "--sparsity", "0.75"]) == 0
    assert "dense/sparse ratio: 2.49" in capsys.readouterr().out
    assert main(["pretrain", "--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "model.preset: 'nope' is not one of" in capsys.readouterr().err
    assert main(["pretrain", "--corpus", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["gmp", "rigl"])
def test_flops_integrate_the_schedule(micro_config, method):
    """Training FLOPs equal a hand-computed sum over steps of the density in use at each step."""
    from sparselm.sparsity.masks import n_zeros

    cfg = micro_config(sparsity=0.75, method=method, max_steps=30, **METHOD_OPTIONS[method])
    summary = pretrain(cfg, progress=False, log=lambda *_: None)
    shape = cfg.shape()
    d, ff = shape.n_embd, shape.n_inner
    sizes = [d * 3 * d, d * d, d * ff, ff * d] * shape.n_layer
    tokens = cfg.optim.batch_size * shape.block_size
    start, end = round(0.2 * 30), round(0.8 * 30)
    expected, sparsity_now, params = 0.0, 0.0 if method == "gmp" else 0.75, []
    for step in range(30):
        zeros = [n_zeros(n, sparsity_now) for n in sizes]
        dens = {f"transformer.h.{i // 4}.{k}": 1 - z / n for i, (z, n, k) in
                enumerate(zip(zeros, sizes, ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"] * shape.n_layer))}
        rigl_update = method == "rigl" and 0 < step < 27 and step % 3 == 0  # step 27 would drop 0: no update
        expected += tokens * flops.train_flops_per_token(shape, dens, dense_weight_grad=rigl_update)
        params.append(summary["n_params"] - sum(zeros))
        if method == "gmp" and start < step <= end and ((step - start) % 3 == 0 or step == end):
            progress = (step - start) / (end - start)
            sparsity_now = 0.75 * (1 - (1 - progress) ** 3)  # cubic; the new mask is used from the next step
    assert summary["train_flops"] == pytest.approx(expected, rel=1e-9)
    assert summary["average_param_count"] == pytest.approx(sum(params) / 30, rel=1e-9)
    assert summary["final_param_count"] == summary["n_params"] - sum(n_zeros(n, 0.75) for n in sizes)
    if method == "gmp":  # a dense start costs more than static sparsity at the same final sparsity
        static = flops.train_flops_per_token(shape, 0.25) * tokens * 30
        assert summary["train_flops"] > static
