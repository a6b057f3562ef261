"""Score the E2E golden sets with the official E2E scorer's mteval-v13a-sig.pl (BLEU, NIST).

Run from the repository root with a checkout of https://github.com/tuetschek/e2e-metrics (perl needed):

    python tests/golden/e2e_official_scores.py /path/to/e2e-metrics

It writes the systems as the scorer's ``measure_scores.py`` does (``create_mteval_file``: one
reference set per reference position, shorter reference lists padded with empty segments), runs
``perl mteval/mteval-v13a-sig.pl -r ref.sgm -s src.sgm -t tst.sgm`` and prints the scores as JSON for
``tests/golden_metrics.json``.
"""

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metric_fixtures import systems  # noqa: E402


def write_sgm(items, path: Path, kind: str) -> None:
    data = [[]]
    for i, inst in enumerate(items):
        inst = inst if isinstance(inst, list) else [inst]
        for k, ref in enumerate(inst):
            if len(data) <= k:
                data.append([""] * i)
            data[k].append(ref)
        for k in range(len(inst), len(data)):
            data[k].append("")
    lines = [f'<{kind}set setid="e2e" srclang="any" trglang="en">']
    for k, column in enumerate(data):
        sysid = kind + ("" if len(data) == 1 else f"_{k}")
        lines.append(f'<doc docid="test" genre="news" origlang="any" sysid="{sysid}">\n<p>')
        lines += [f'<seg id="{n}">{seg}</seg>' for n, seg in enumerate(column, start=1)]
        lines.append("</p>\n</doc>")
    lines.append(f"</{kind}set>")
    path.write_text("\n".join(lines), encoding="utf-8")


def official(scorer: Path, hyps, refs) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_sgm(refs, tmp / "ref.sgm", "ref")
        write_sgm(hyps, tmp / "tst.sgm", "tst")
        write_sgm([""] * len(hyps), tmp / "src.sgm", "src")
        out = subprocess.check_output(["perl", str(scorer / "mteval" / "mteval-v13a-sig.pl"), "-r", tmp / "ref.sgm",
                                       "-s", tmp / "src.sgm", "-t", tmp / "tst.sgm", "-f", tmp / "log.txt"],
                                      stderr=subprocess.STDOUT, text=True)
    nist = float(re.search(r"NIST score = ([0-9.]+)", out).group(1))
    bleu = float(re.search(r"BLEU score = ([0-9.]+)", out).group(1))
    return {"bleu": round(100 * bleu, 6), "nist": round(nist, 6)}


if __name__ == "__main__":
    scorer = Path(sys.argv[1])
    scores = {name: official(scorer, hyps, refs) for name, (task, hyps, refs) in systems().items() if task == "e2e"}
    print(json.dumps(scores, indent=1))
