"""Crash-safe file writes: a summary or result file is either the old one or the new one, never half."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: str | Path, data) -> None:
    """Write ``data`` as JSON to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
