"""Seeds aggregated: one row per cell with the mean, the standard deviation and the number of seeds
of every numeric field (``bleu``, ``bleu_std``, ``n_seeds``), for results.csv and the report."""

from __future__ import annotations

from collections import defaultdict
from statistics import mean, stdev

CELL_KEYS = ("task", "mode", "sparsity", "method")


def aggregate(rows: list[dict], keys=CELL_KEYS) -> dict[tuple, dict]:
    """Finished rows grouped by ``keys``: numeric fields averaged over seeds, with ``<field>_std``
    (sample standard deviation; 0 for one seed) and ``n_seeds``."""
    groups = defaultdict(list)
    for r in rows:
        if r.get("status") == "done":
            groups[tuple(r[k] for k in keys)].append(r)
    out = {}
    for k, rs in groups.items():
        merged = {f: v for f, v in rs[0].items() if not isinstance(v, (list, dict))}
        for f in list(merged):
            vals = [r.get(f) for r in rs]
            if f not in keys and f != "seed" and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                merged[f] = mean(vals)
                merged[f + "_std"] = stdev(vals) if len(vals) > 1 else 0.0
        merged.pop("seed", None)
        merged["n_seeds"] = len(rs)
        out[k] = merged
    return out
