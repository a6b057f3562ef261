"""Where the shared data lives: ``$SPARSELM_DATA`` or the ``shared/data`` folder beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "SPARSELM_DATA"


def data_root() -> Path:
    """The data folder: ``$SPARSELM_DATA``, else ``shared/data`` found from the working directory
    or this source tree upwards."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"${ENV_VAR}={env} is not a directory; point it at the folder holding corpus/, e2e/ ...")
        return path
    starts = [Path.cwd(), Path(__file__).resolve().parent]
    for start in starts:
        for folder in [start, *start.parents]:
            for candidate in (folder / "shared" / "data", folder.parent / "shared" / "data"):
                if (candidate / "corpus").is_dir():
                    return candidate
    raise FileNotFoundError(
        "could not find the sparselm data folder (shared/data with corpus/, e2e/ ...); "
        f"set ${ENV_VAR}=/path/to/data or pass the path explicitly"
    )


def default_corpus() -> Path:
    return data_root() / "corpus"
