"""Where the training loop's metric rows go: ``metrics.jsonl`` always (reports, resume and tests read
it), TensorBoard and Weights & Biases when asked for (``run.report_to``, ``--report-to``).

TensorBoard goes through ``torch.utils.tensorboard`` (the ``tensorboard`` package: ``sparselm[log]``)
into ``<run>/tensorboard``. W&B is never required: asked for but not installed, or installed but not
configured (no API key, no ``WANDB_MODE=offline``), it is skipped with one warning and training goes on.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .._optional import require

log = logging.getLogger(__name__)

REPORTERS = ("jsonl", "tensorboard", "wandb")


def parse_report_to(value: str) -> list[str]:
    """``"jsonl,tensorboard"`` -> names, jsonl always first; unknown names are a ValueError."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = sorted(set(names) - set(REPORTERS))
    if unknown:
        raise ValueError(f"unknown reporter {', '.join(unknown)}; choose from {', '.join(REPORTERS)} (comma-separated)")
    return ["jsonl"] + [n for n in REPORTERS[1:] if n in names]


class JsonlReporter:
    def __init__(self, out: Path, **_):
        self.file = open(out / "metrics.jsonl", "a")

    def log(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardReporter:
    def __init__(self, out: Path, phase: str, **_):
        tensorboard = require("torch.utils.tensorboard", "log", "--report-to tensorboard")
        self.writer = tensorboard.SummaryWriter(str(out / "tensorboard"))
        self.prefix = phase.split()[0]  # "pretrain", "finetune"

    def log(self, row: dict) -> None:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{self.prefix}/{key}", value, row["step"])

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    def __init__(self, out: Path, phase: str, config: dict, **_):
        import wandb  # checked by open_reporters

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sparselm"), name=f"{out.name} {phase}",
                              dir=str(out), config=config, reinit=True)

    def log(self, row: dict) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        self.run.finish()


def _wandb_ready() -> str | None:
    """None when W&B can log, else why not."""
    try:
        import wandb
    except ImportError:
        return "wandb is not installed (pip install wandb)"
    if os.environ.get("WANDB_MODE") in ("offline", "disabled") or os.environ.get("WANDB_API_KEY"):
        return None
    try:
        if wandb.api.api_key:
            return None
    except Exception:  # noqa: BLE001  (any failure to read the login means: not configured)
        pass
    return "wandb is not configured (wandb login, WANDB_API_KEY, or WANDB_MODE=offline)"


class Reporters:
    """All the configured reporters behind one ``log(row)``."""

    def __init__(self, names: list[str], out: Path, phase: str, config: dict):
        self.reporters = []
        for name in names:
            if name == "wandb" and (why := _wandb_ready()) is not None:
                log.warning("warning: --report-to wandb skipped: %s", why)
                continue
            cls = {"jsonl": JsonlReporter, "tensorboard": TensorBoardReporter, "wandb": WandbReporter}[name]
            self.reporters.append(cls(out=out, phase=phase, config=config))

    def log(self, row: dict) -> None:
        for r in self.reporters:
            r.log(row)

    def close(self) -> None:
        for r in self.reporters:
            r.close()
