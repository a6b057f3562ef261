"""The one training loop: fine-tuning resume, signals at step boundaries, DDP and torch.compile for
every phase, and a Llama model end to end."""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sparselm.cli.main import main
from sparselm.sparsity import Sparsifier
from sparselm.training import FinetuneConfig, TrainingInterrupted, finetune, pretrain

from conftest import MICRO_MODEL, make_config

loop_module = importlib.import_module("sparselm.training.loop")
QUIET = dict(log=lambda *_: None)


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def same_weights(a, b) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def ft_config(sparse_run, out, mode="sparse", **kw):
    base = dict(from_run=str(sparse_run), task="e2e", mode=mode, out=str(out), max_steps=12, batch_size=8,
                limit_train=96, val_limit=16, eval_every=6, ckpt_every=4, lr=3e-3, progress=False)
    base.update(kw)
    return make_config(FinetuneConfig, **base)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_finetune_resume_after_a_crash_is_bit_exact(sparse_run, tmp_path, monkeypatch, mode):
    finetune(ft_config(sparse_run, tmp_path / "full", mode), **QUIET)
    real_save = loop_module.save_checkpoint

    def crash_after_step_8(run_dir, model, optimizer, masks, state):
        path = real_save(run_dir, model, optimizer, masks, state)
        if state["step"] == 8:
            raise RuntimeError("simulated crash")
        return path

    monkeypatch.setattr(loop_module, "save_checkpoint", crash_after_step_8)
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(ft_config(sparse_run, tmp_path / "crashed", mode), **QUIET)
    monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
    summary = finetune(ft_config(sparse_run, tmp_path / "crashed", mode), resume=True, **QUIET)
    assert summary["steps"] == 12
    assert same_weights(tmp_path / "full", tmp_path / "crashed")
    loss = lambda run: {r["step"]: r["loss"] for r in metrics(run) if "loss" in r}  # noqa: E731
    assert loss(tmp_path / "full") == loss(tmp_path / "crashed")  # each step once, step 9 included
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert full["final_val_loss"] == summary["final_val_loss"] and full["finetune_flops"] == summary["finetune_flops"]
    assert not (tmp_path / "crashed" / "checkpoint").exists()  # kept through the crash, dropped once finished


def test_finetune_resume_checks_the_config_and_a_finished_run_is_left_alone(sparse_run, tmp_path):
    out = tmp_path / "ft"
    finetune(ft_config(sparse_run, out, max_steps=4), **QUIET)
    for change in (dict(mode="dense"), dict(lr=1e-2)):
        with pytest.raises(ValueError, match="cannot resume: the config differs"):
            finetune(ft_config(sparse_run, out, max_steps=4, **change), resume=True, **QUIET)
    (out / "eval").mkdir()
    (out / "eval" / "e2e-test.json").write_text("{}")
    before = (out / "summary.json").read_bytes()
    again = finetune(ft_config(sparse_run, out, max_steps=4), resume=True, **QUIET)
    assert (out / "summary.json").read_bytes() == before and again["steps"] == 4
    assert (out / "eval" / "e2e-test.json").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_between_optimizer_step_and_masking_stops_at_the_step_boundary(micro_config, tmp_path, monkeypatch, signum):
    """The signal lands inside step 7 (after optimizer.step, before the masks are re-applied); the
    checkpoint is labelled with the steps it holds, so the resumed run equals an uninterrupted one."""
    pretrain(micro_config(out=str(tmp_path / "full"), sparsity=0.5), **QUIET)
    real_after_step = Sparsifier.after_step

    def signal_mid_step(self, step):
        if step == 6:
            os.kill(os.getpid(), signum)
        real_after_step(self, step)

    monkeypatch.setattr(Sparsifier, "after_step", signal_mid_step)
    with pytest.raises(TrainingInterrupted) as stopped:
        pretrain(micro_config(out=str(tmp_path / "stopped"), sparsity=0.5), **QUIET)
    assert stopped.value.step == 7 and stopped.value.signum == signum
    state = json.loads((tmp_path / "stopped" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 7
    monkeypatch.setattr(Sparsifier, "after_step", real_after_step)
    pretrain(micro_config(out=str(tmp_path / "stopped"), sparsity=0.5), resume=True, **QUIET)
    assert same_weights(tmp_path / "full", tmp_path / "stopped")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers are put back after the loop


@pytest.mark.slow
@pytest.mark.parametrize("signum,rc", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_to_a_training_process_save_a_checkpoint_and_exit_cleanly(small_corpus, cache_dir, tmp_path, signum, rc):
    out = tmp_path / "run"
    env = dict(os.environ, SPARSELM_CACHE=str(cache_dir), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "sparselm", "pretrain", "--corpus", str(small_corpus), "--out", str(out),
           "--max-steps", "5000", "--batch-size", "8", "--sparsity", "0.5", "--no-progress",
           "--set", "run.log_every=1", "--set", "run.ckpt_every=1000", "--set", "optim.warmup_steps=5",
           *[f"--set=model.{k}={v}" for k, v in MICRO_MODEL.items()]]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == rc, err[-2000:]
    assert err.strip().count("\n") == 0 and f"stopped by {signal.Signals(signum).name} after step" in err  # one line
    step = int(err.split("after step ")[1].split(";")[0])
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == step < 1000
    assert max(r["step"] for r in metrics(out)) == step  # nothing logged past the checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_finetune_under_torchrun(sparse_run, tmp_path, cache_dir, parallel):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / f"{parallel}-ft"
    env = dict(os.environ, SPARSELM_CACHE=str(cache_dir), OMP_NUM_THREADS="1")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "sparselm", "finetune", "--from", str(sparse_run),
           "--out", str(out), "--mode", "sparse", "--max-steps", "8", "--batch-size", "8", "--limit-train", "64",
           "--device", "cpu", "--no-progress", "--set", "data.val_limit=16", "--set", "run.eval_every=4",
           "--parallel", parallel]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 8
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    masks, weights = load_file(str(sparse_run / "masks.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.count_nonzero(weights[k][~m]) == 0 for k, m in masks.items())


@pytest.mark.slow
def test_compile_on_cpu_matches_eager_for_pretraining_and_runs_finetuning(micro_config, sparse_run, tmp_path):
    eager = pretrain(micro_config(out=str(tmp_path / "eager"), sparsity=0.5, max_steps=10), **QUIET)
    compiled = pretrain(micro_config(out=str(tmp_path / "compiled"), sparsity=0.5, max_steps=10, compile=True), **QUIET)
    la = [r["loss"] for r in metrics(tmp_path / "eager") if "loss" in r]
    lb = [r["loss"] for r in metrics(tmp_path / "compiled") if "loss" in r]
    assert len(la) == len(lb) == 10 and max(abs(a - b) for a, b in zip(la, lb)) < 1e-4
    assert abs(eager["final_val_loss"] - compiled["final_val_loss"]) < 1e-4
    summary = finetune(ft_config(sparse_run, tmp_path / "ft", "dense", max_steps=3, compile=True), **QUIET)
    assert summary["steps"] == 3


@pytest.mark.slow
def test_llama_rigl_pretrain_dense_finetune_evaluate_end_to_end(small_corpus, cache_dir, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    monkeypatch.setenv("SPARSELM_CACHE", str(cache_dir))
    run, ft = tmp_path / "llama", tmp_path / "llama-ft"
    assert main(["pretrain", "--preset", "llama-tiny", "--sparsity", "0.75", "--method", "rigl", "--corpus", str(small_corpus),
                 "--out", str(run), "--max-steps", "20", "--batch-size", "8", "--no-progress", "--set", "model.n_layer=2",
                 "--set", "model.vocab_size=512", "--set", "sparsity.update_every=5", "--set", "optim.warmup_steps=2",
                 "--set", "run.eval_batches=2"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["family"] == "llama" and summary["sparsity"]["method"] == "rigl"
    assert summary["sparsity"]["measured"] == pytest.approx(0.75, abs=1e-3)
    assert len(summary["sparsity"]["layers"]) == 7 * 2  # q, k, v, o, gate, up, down per layer
    model = AutoModelForCausalLM.from_pretrained(run)
    assert isinstance(model, LlamaForCausalLM) and model.config.num_key_value_heads == 2
    assert main(["finetune", "--from", str(run), "--task", "e2e", "--mode", "dense", "--out", str(ft), "--max-steps", "6",
                 "--batch-size", "8", "--limit-train", "64", "--no-progress", "--set", "data.val_limit=16"]) == 0
    assert json.loads((ft / "summary.json").read_text())["formerly_zero_weights_now_nonzero"] > 0
    assert main(["evaluate", "--model", str(ft), "--task", "e2e", "--limit", "4", "--beams", "2",
                 "--max-new-tokens", "8", "--no-progress"]) == 0
    result = json.loads((ft / "eval" / "e2e-test.json").read_text())
    assert set(result["metrics"]) >= {"bleu", "nist", "meteor", "rouge_l", "cider"}


def test_a_second_writer_of_a_run_directory_is_refused_with_the_holders_pid(small_corpus, cache_dir, tmp_path, micro_config):
    from sparselm.training.lock import RunLockedError

    out = tmp_path / "run"
    env = dict(os.environ, SPARSELM_CACHE=str(cache_dir))
    cmd = [sys.executable, "-m", "sparselm", "pretrain", "--corpus", str(small_corpus), "--out", str(out),
           "--max-steps", "100000", "--batch-size", "8", "--no-progress", "--set", "optim.warmup_steps=1",
           "--set", "run.ckpt_every=100000", *[f"--set=model.{k}={v}" for k, v in MICRO_MODEL.items()]]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"is being written by another sparselm process (PID {first.pid}:" in second.stderr
        with pytest.raises(RunLockedError, match=f"PID {first.pid}"):  # in-process callers too
            pretrain(micro_config(out=str(out)), resume=True, **QUIET)
    finally:
        first.kill()  # kill -9: the OS drops the lock with the process
        first.wait()
    resumed = pretrain(micro_config(out=str(tmp_path / "other")), **QUIET)  # unrelated directory: fine
    assert resumed["steps"] == 20
    from sparselm.training.lock import run_lock

    with run_lock(out):  # the dead holder left no stale lock
        pass
