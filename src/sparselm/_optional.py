"""Optional dependencies (the package's extras), imported where they are used.

The core install (``pip install sparselm``) pre-trains, sparsifies, fine-tunes densely or sparsely
and computes BLEU/NIST; the rest is in extras: ``eval`` (sacrebleu, pycocoevalcap), ``report``
(matplotlib), ``lora`` (peft), ``data`` (pyarrow, zstandard), ``all``. ``require`` imports one of
them or raises ``MissingExtra`` naming the extra that installs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError, RuntimeError):
    """An optional dependency is not installed; the message names the extra that installs it.
    Also a ``RuntimeError``, so the CLI prints it as one line (``sparselm finetune: error: ...``)."""

    def __init__(self, module: str, extra: str, purpose: str, cause: ImportError | None = None):
        self.package, self.extra, self.purpose = module.split(".")[0], extra, purpose
        #: why, without the purpose: "needs peft: pip install 'sparselm[lora]'"
        self.reason = f"needs {self.package}: pip install 'sparselm[{extra}]'"
        missing = getattr(cause, "name", None)
        if cause is not None and missing and missing.split(".")[0] != self.package:
            self.reason += f" (importing {module} failed: {cause})"  # installed, but one of its own imports is not
        super().__init__(f"{purpose} {self.reason}", name=module)


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or ``MissingExtra``: "LoRA fine-tuning needs peft: pip install 'sparselm[lora]'"."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(module, extra, purpose, e) from e
