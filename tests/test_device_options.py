"""Options of the hot path on the CPU: bf16 autocast, activation checkpointing, MFU logging, and the
warnings for options that do nothing on this device."""

import json

import pytest
import torch

from sparselm import flops
from sparselm.cli.main import main
from sparselm.training import pretrain
from sparselm.training.config import RunConfig
from sparselm.training.distributed import Dist
from sparselm.training.loop import device_peak_flops, device_warnings

QUIET = dict(progress=False, log=lambda *_: None)


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_peak_flops_table_and_mfu():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert flops.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12  # the specific name wins over "H100"
    assert flops.peak_flops("NVIDIA H200", "float32") == 989e12 / 2  # TF32
    assert flops.peak_flops("NVIDIA A100-SXM4-80GB", "float16") == 312e12
    assert flops.peak_flops("Some CPU", "bfloat16") is None
    assert flops.mfu(6e9, 1e5, 1e15) == pytest.approx(0.6)
    assert flops.mfu(6e9, 1e5, None) is None
    assert device_peak_flops(torch.device("cpu"), RunConfig()) is None
    assert device_peak_flops(torch.device("cpu"), RunConfig(peak_tflops=2.0)) == 2e12


def test_options_that_do_nothing_here_are_named():
    cpu, one = torch.device("cpu"), Dist()
    assert device_warnings(RunConfig(), cpu, one) == []
    said = " | ".join(device_warnings(RunConfig(parallel="fsdp", kernel="semi-structured", dtype="float16"), cpu, one))
    assert "run.parallel=fsdp has no effect in a single process" in said
    assert "run.kernel=semi-structured needs a CUDA GPU" in said
    assert "run.dtype=float16 on the CPU" in said
    assert device_warnings(RunConfig(parallel="fsdp"), cpu, Dist(rank=0, world_size=2)) == []


def test_cli_warns_about_an_option_without_effect(small_corpus, cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSELM_CACHE", str(cache_dir))
    assert main(["pretrain", "--preset", "tiny", "--corpus", str(small_corpus), "--out", str(tmp_path / "run"),
                 "--max-steps", "2", "--batch-size", "2", "--no-progress", "--parallel", "fsdp",
                 "--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2",
                 "--set", "model.vocab_size=512", "--set", "model.block_size=32", "--set", "optim.warmup_steps=1",
                 "--set", "run.eval_batches=1"]) == 0
    assert "run.parallel=fsdp has no effect in a single process" in capsys.readouterr().err


@pytest.mark.slow
def test_bf16_autocast_and_activation_checkpointing_on_cpu(micro_config, tmp_path):
    """bf16 autocast trains on the CPU close to fp32; activation checkpointing recomputes the
    same values (loss equal to the plain run); MFU is logged once a peak is known."""
    plain = pretrain(micro_config(out=str(tmp_path / "fp32"), sparsity=0.5, max_steps=10, peak_tflops=1.0), **QUIET)
    ckpt = pretrain(micro_config(out=str(tmp_path / "ac"), sparsity=0.5, max_steps=10, activation_checkpointing=True), **QUIET)
    bf16 = pretrain(micro_config(out=str(tmp_path / "bf16"), sparsity=0.5, max_steps=10, run=dict(dtype="bfloat16")), **QUIET)
    fp32_loss = [r["loss"] for r in rows(tmp_path / "fp32") if "loss" in r]
    ac_loss = [r["loss"] for r in rows(tmp_path / "ac") if "loss" in r]
    bf16_loss = [r["loss"] for r in rows(tmp_path / "bf16") if "loss" in r]
    assert max(abs(a - b) for a, b in zip(fp32_loss, ac_loss)) < 1e-5
    assert abs(ckpt["final_val_loss"] - plain["final_val_loss"]) < 1e-5
    assert len(bf16_loss) == 10 and all(abs(a - b) < 0.05 for a, b in zip(fp32_loss, bf16_loss))
    assert bf16_loss[-1] < bf16_loss[0]  # it learns
    assert bf16["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-3)
    logged = [r for r in rows(tmp_path / "fp32") if "loss" in r]
    fpt = flops.train_flops_per_token(json_shape(tmp_path / "fp32"))
    assert all(r["mfu"] == pytest.approx(fpt * r["tokens_per_s"] / 1e12, rel=1e-2, abs=1e-4) for r in logged)
    assert all("mfu" not in r for r in rows(tmp_path / "bf16"))  # no peak known for a CPU


@pytest.mark.slow
def test_fp16_pretraining_on_cpu_scales_the_loss_and_resumes_its_scale(micro_config, tmp_path):
    """fp16 autocast with GradScaler end to end: it learns, logs its skipped steps, saves the scale."""
    cfg = micro_config(out=str(tmp_path / "fp16"), sparsity=0.5, max_steps=10, run=dict(dtype="float16", keep_checkpoint=True))
    summary = pretrain(cfg, **QUIET)
    losses = [r for r in rows(tmp_path / "fp16") if "loss" in r]
    assert all("skipped_steps" in r for r in losses) and losses[-1]["loss"] < losses[0]["loss"]
    assert summary["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-3)
    state = json.loads((tmp_path / "fp16" / "checkpoint" / "trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] > 0 and state["skipped_steps"] == losses[-1]["skipped_steps"]


def json_shape(run):
    from sparselm.models import ModelShape

    return ModelShape(**json.loads((run / "summary.json").read_text())["model"])


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_activation_checkpointing_keeps_fewer_activations_and_the_same_gradients(preset):
    from sparselm.models import build_model, get_preset
    from sparselm.training.loop import prepare_model

    shape = get_preset(preset).override(n_layer=4, vocab_size=256, block_size=64)
    x = torch.randint(0, 256, (2, 64))
    saved, grads = {}, {}
    for on in (False, True):
        torch.manual_seed(0)
        model = prepare_model(build_model(shape), RunConfig(activation_checkpointing=on), torch.device("cpu"), Dist()).train()
        nbytes = [0]

        def pack(t):
            nbytes[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # what the backward keeps
            loss = model(input_ids=x).logits.sum()
        loss.backward()
        saved[on] = nbytes[0]
        grads[on] = [p.grad.clone() for p in model.parameters()]
    assert saved[True] < 0.5 * saved[False], saved  # the blocks' activations are recomputed, not kept
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads[False], grads[True]))
