"""Metrics reach TensorBoard and W&B when asked for; W&B is never required; jsonl is always written."""

from __future__ import annotations

import json
import sys
import types

import pytest

from sparselm.config import ConfigError
from sparselm.training import pretrain

QUIET = dict(log=lambda *a: None)


def test_tensorboard_event_files_are_written_and_readable(micro_config, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    pretrain(micro_config(out=str(out), sparsity=0.5, max_steps=6, eval_every=3, report_to="tensorboard"), **QUIET)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"pretrain/loss", "pretrain/lr", "pretrain/val_loss", "pretrain/sparsity", "pretrain/tokens_per_s"} <= tags
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in logged if "loss" in r}
    assert {e.step: round(e.value, 5) for e in events.Scalars("pretrain/loss")} == pytest.approx(losses, abs=1e-5)
    assert [e.step for e in events.Scalars("pretrain/val_loss")] == [3, 6]


def test_wandb_gets_every_row_when_configured(micro_config, tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, row, step):
            calls.append(("log", step, row))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or Run(), api=types.SimpleNamespace(api_key=None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    pretrain(micro_config(out=str(out), max_steps=4, warmup_steps=1, eval_every=2, report_to="wandb"), **QUIET)
    assert calls[0][0] == "init" and calls[0][1]["config"]["optim"]["max_steps"] == 4
    assert calls[-1] == ("finish",)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(step, row) for _, step, row in calls[1:-1]] == [(r["step"], {k: v for k, v in r.items() if k != "step"}) for r in logged]


def test_wandb_not_installed_or_not_configured_is_skipped_with_a_warning(micro_config, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    pretrain(micro_config(out=str(tmp_path / "a"), max_steps=2, warmup_steps=1, report_to="wandb,jsonl"), **QUIET)
    assert "wandb is not installed" in caplog.text
    assert (tmp_path / "a" / "metrics.jsonl").read_text()  # training went on, jsonl written

    caplog.clear()
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(api=types.SimpleNamespace(api_key=None)))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    pretrain(micro_config(out=str(tmp_path / "b"), max_steps=2, warmup_steps=1, report_to="wandb"), **QUIET)
    assert "wandb is not configured" in caplog.text


def test_unknown_reporter_is_a_config_error(micro_config):
    with pytest.raises(ConfigError, match="run.report_to: unknown reporter mlflow"):
        micro_config(report_to="tensorboard,mlflow")
