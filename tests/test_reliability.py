"""Damaged run files and a full disk. A damaged file is an error naming it and what to do, never a
library traceback or silently wrong weights; a full disk loses no data, and the run resumes to the
same bits as an uninterrupted one."""

import errno
import importlib
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparselm import config
from sparselm.cli.main import main
from sparselm.files import MANIFEST, CorruptFileError, NoSpaceError, sha256, verify
from sparselm.models.runs import load_run
from sparselm.training import FinetuneConfig, PretrainConfig, finetune, pretrain

from conftest import make_config

checkpoint_module = importlib.import_module("sparselm.training.checkpoint")
QUIET = dict(log=lambda *_: None)


def damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how.startswith("truncate"):
        path.write_bytes(data[: len(data) // 2])
    else:  # one byte in the middle: the payload of a weights file, a value of a JSON file
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(data)


@pytest.fixture
def run(sparse_run, tmp_path):
    """A private copy of the finished 30-step sparse run, final checkpoint included."""
    return shutil.copytree(sparse_run, tmp_path / "run")


def further(run):
    """The config that trains ``run`` on from its checkpoint to step 40 (a resumable change)."""
    saved = json.loads((run / "train_config.json").read_text())
    saved["run"]["out"], saved["optim"]["max_steps"] = str(run), 40
    return config.from_dict(PretrainConfig, saved)


def named(path) -> str:
    return re.escape(str(path)) + r" (is corrupt|cannot be read)"


# ---- damaged files -------------------------------------------------------------------------------
CHECKPOINT_FILES = ["checkpoint/model.safetensors", "checkpoint/masks.safetensors", "checkpoint/optimizer.pt",
                    "checkpoint/rng.pt", "checkpoint/trainer_state.json", "train_config.json"]


@pytest.mark.parametrize("how", ["truncate", "flip", "truncate, no manifest"])
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_damaged_checkpoint_file_is_an_error_naming_it(run, name, how):
    cfg = further(run)
    if how.endswith("no manifest"):  # a checkpoint of an older sparselm: parse errors still name the file
        (run / "checkpoint" / MANIFEST).unlink(missing_ok=True)
    damage(run / name, how)
    with pytest.raises(CorruptFileError, match=named(run / name)):
        pretrain(cfg, resume=True, **QUIET)


@pytest.mark.parametrize("how", ["truncate", "flip", "truncate, no manifest"])
@pytest.mark.parametrize("name", ["model.safetensors", "masks.safetensors", "summary.json", "config.json"])
def test_a_damaged_file_of_a_finished_run_is_an_error_naming_it(run, name, how):
    if how.endswith("no manifest"):  # an older run or an HF directory from elsewhere
        (run / MANIFEST).unlink(missing_ok=True)
    damage(run / name, how)
    with pytest.raises(CorruptFileError, match=named(run / name)):
        load_run(run)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_damaged_manifest_is_an_error_naming_it(run, how):
    cfg = further(run)
    damage(run / MANIFEST, how)
    with pytest.raises(CorruptFileError, match=named(run / MANIFEST)):
        load_run(run)
    damage(run / "checkpoint" / MANIFEST, how)
    with pytest.raises(CorruptFileError, match=named(run / "checkpoint" / MANIFEST)):
        pretrain(cfg, resume=True, **QUIET)


def test_a_metrics_row_cut_off_by_a_crash_is_dropped_and_a_damaged_one_named(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.9}\n{"step": 3, "lo')
    checkpoint_module.truncate_metrics(metrics, 2)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    metrics.write_text('{"step": 1, "lo\n{"step": 2, "loss": 4.9}\n')
    with pytest.raises(CorruptFileError, match=re.escape(f"{metrics} is corrupt at line 1")):
        checkpoint_module.truncate_metrics(metrics, 2)


def test_evaluate_and_finetune_refuse_a_damaged_run_in_one_line(run, tmp_path, capsys):
    masks = run / "masks.safetensors"
    data = bytearray(masks.read_bytes())
    data[-4096:] = b"\x01" * 4096  # mask bytes set to 1: more weights kept than the run trained
    masks.write_bytes(data)
    assert main(["evaluate", "--model", str(run), "--limit", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{masks} is corrupt (sha256 mismatch with {run / MANIFEST})" in err[0]
    assert not (run / "eval").exists()
    cfg = make_config(FinetuneConfig, from_run=str(run), task="e2e", mode="sparse", out=str(tmp_path / "ft"), max_steps=2)
    with pytest.raises(CorruptFileError, match="restore the run directory from a copy or train the run again"):
        finetune(cfg, **QUIET)


def test_a_damaged_checkpoint_is_not_silently_replaced_by_the_older_one(run):
    cfg = further(run)
    shutil.copytree(run / "checkpoint", run / "checkpoint.old")  # as after a crash between swap and cleanup
    damage(run / "checkpoint" / "optimizer.pt", "truncate")
    both = named(run / "checkpoint" / "optimizer.pt") + ".*" + re.escape(f"{run / 'checkpoint.old'} holds the checkpoint before it")
    with pytest.raises(CorruptFileError, match=both):
        pretrain(cfg, resume=True, **QUIET)


def test_directories_without_a_manifest_still_load_and_resume(run):
    """Runs of older sparselm versions and HF directories have nothing to verify, and that is fine."""
    (run / MANIFEST).unlink(missing_ok=True)
    (run / "checkpoint" / MANIFEST).unlink(missing_ok=True)
    assert load_run(run)[2] is not None
    assert pretrain(further(run), resume=True, **QUIET)["steps"] == 40
    assert verify(run, "") is not None  # the new final save wrote one


# ---- masks that load fine but hold wrong bits --------------------------------------------------------
def write_wrong_masks(directory) -> tuple[str, int, int]:
    """Simulate a bug that writes wrong masks: five bits of one layer flipped, and the manifest's
    checksum of the file updated to match. Returns (layer, recorded kept count, found kept count)."""
    path = directory / "masks.safetensors"
    masks = load_file(str(path))
    layer = sorted(masks)[0]
    expected = int(masks[layer].sum())
    masks[layer].view(-1)[:5] = ~masks[layer].view(-1)[:5]  # an odd number of flips: the count must change
    save_file(masks, str(path))
    if (directory / MANIFEST).exists():
        manifest = json.loads((directory / MANIFEST).read_text())
        manifest["files"]["masks.safetensors"] = {"sha256": sha256(path), "size": path.stat().st_size}
        (directory / MANIFEST).write_text(json.dumps(manifest))
    return layer, expected, int(masks[layer].sum())


def wrong_count(layer, expected, found, source) -> str:
    return rf"layer {re.escape(layer)} keeps {found} of \d+ weights, but {re.escape(str(source))} records {expected}"


def test_checkpoint_masks_with_a_wrong_count_are_an_error_naming_the_layer(run):
    cfg = further(run)
    layer, expected, found = write_wrong_masks(run / "checkpoint")
    with pytest.raises(CorruptFileError, match=wrong_count(layer, expected, found, run / "checkpoint" / MANIFEST)):
        pretrain(cfg, resume=True, **QUIET)


@pytest.mark.parametrize("recorded_in", [MANIFEST, "summary.json"])
def test_run_masks_with_a_wrong_count_are_an_error_naming_the_layer(run, recorded_in):
    if recorded_in == "summary.json":  # no manifest: the summary's per-layer sparsity is the record
        (run / MANIFEST).unlink(missing_ok=True)
    layer, expected, found = write_wrong_masks(run)
    with pytest.raises(CorruptFileError, match=wrong_count(layer, expected, found, run / recorded_in)):
        load_run(run)


# ---- a full disk -----------------------------------------------------------------------------------
def full_disk_on_call(monkeypatch, owner, name: str, call: int) -> None:
    """From its ``call``-th call on, ``owner.name`` (a writer) writes a few bytes and then fails the way
    a full disk does."""
    real, calls = getattr(owner, name), []

    def writer(obj, dest, *args, **kwargs):
        calls.append(dest)
        if len(calls) < call:
            return real(obj, dest, *args, **kwargs)
        if hasattr(dest, "write"):
            dest.write(b"\0" * 100)
        else:
            with open(dest, "wb") as fh:
                fh.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(owner, name, writer)


FULL_DISK = {  # what fills the disk: (owner, writer, failing call, file named, what is left)
    "first checkpoint": (torch, "save", 1, "checkpoint/optimizer.pt", "no checkpoint was written yet"),
    "second checkpoint": (checkpoint_module, "save_model", 2, "checkpoint/model.safetensors",
                          "the previous checkpoint at {run}/checkpoint is intact"),
    "final save": (checkpoint_module, "save_file", 3, "masks.safetensors",
                   "the previous checkpoint at {run}/checkpoint is intact"),
}


@pytest.mark.parametrize("when", list(FULL_DISK))
def test_a_full_disk_loses_nothing_and_the_run_resumes_to_the_same_bits(micro_config, tmp_path, monkeypatch, when):
    owner, name, call, file, left = FULL_DISK[when]
    full = pretrain(micro_config(out=str(tmp_path / "full"), sparsity=0.75), **QUIET)
    run = tmp_path / "run"
    cfg = micro_config(out=str(run), sparsity=0.75)
    full_disk_on_call(monkeypatch, owner, name, call)
    with pytest.raises(NoSpaceError) as e:
        pretrain(cfg, **QUIET)
    assert str(e.value).startswith(f"no space left on device while writing {run / file}; {left.format(run=run)}")
    assert not any(p.name.endswith(".tmp") for p in run.rglob("*"))  # checkpoint.tmp, final.tmp, summary.json.tmp
    assert not (run / "summary.json").exists() and not (run / "model.safetensors").exists()
    if when != "first checkpoint":
        assert verify(run / "checkpoint", "")["step"] == (10 if when == "second checkpoint" else 20)

    monkeypatch.undo()
    resumed = pretrain(cfg, resume=True, **QUIET)
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final_val_loss"] == full["final_val_loss"] and resumed["train_flops"] == full["train_flops"]
    assert verify(run, "") is not None


def test_the_cli_reports_a_full_disk_in_one_line(small_corpus, cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSELM_CACHE", str(cache_dir))
    full_disk_on_call(monkeypatch, torch, "save", 1)
    out = tmp_path / "run"
    rc = main(["pretrain", "--corpus", str(small_corpus), "--out", str(out), "--max-steps", "2", "--batch-size", "2",
               "--no-progress", "--set", "run.ckpt_every=1", "--set", "optim.warmup_steps=1", "--set", "model.n_layer=1", "--set", "model.n_embd=32",
               "--set", "model.n_head=2", "--set", "model.vocab_size=512", "--set", "model.block_size=32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1
    assert f"no space left on device while writing {out / 'checkpoint' / 'optimizer.pt'}" in err[0]
