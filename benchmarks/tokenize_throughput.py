"""Tokenizing throughput of ``sparselm data prepare`` next to the tokenizer's own ceiling, and its memory.

For the shipped corpus and for generated corpora of given sizes (the shipped documents repeated in
shuffled order until the size is reached, written as ``.jsonl.gz`` and ``.parquet``, 4 files each,
in a temporary folder that is deleted afterwards) it measures, one after the other:

- the ceiling: the same tokenizer's ``encode_batch_fast`` (same ids as ``encode_batch``, no offsets;
  the faster of the two) over the same documents, read into memory beforehand in 32 MB batches,
  all cores (the tokenizer's own thread pool), only the encode calls timed;
- ``sparselm data prepare --workers N`` in a subprocess: tokens/s of its tokenizing pass (reading,
  tokenizing, writing shards: what its summary prints), its whole wall time (start-up and imports
  included), and the peak resident memory of its process tree (main process + workers, RSS summed,
  sampled every 0.2 s; shared pages counted once per process, so an upper bound).

Token counts include the EOS appended to each document, in both. The ceiling of a generated size is
measured before and after its formats' runs (their documents are the same) and the mean is used, so
that a slow drift in the machine's load hits both sides alike. On a machine shared with other work
the wall-clock rates still move with the load, so the table also gives tokens per CPU-second
(ceiling: the encode calls, all threads; prepare: the whole command, workers and start-up included)
and the highest 1-minute load average seen during each prepare run.

    python benchmarks/tokenize_throughput.py --sizes-mb 250 1000
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BATCH_CHARS = 32_000_000


def ceiling(corpus: str, tokenizer: str) -> dict:
    """(Run in a subprocess with TOKENIZERS_PARALLELISM=true.) encode_batch_fast over the documents."""
    from sparselm.data.paths import data_root
    from sparselm.data.sources import DocumentStream, corpus_files
    from sparselm.data.tokenizer import load_pretrained

    tok, _ = load_pretrained(tokenizer, data_root)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    tokens = docs = 0
    seconds = cpu = 0.0
    batch, chars = [], 0

    def run(batch):
        nonlocal tokens, seconds, cpu
        t0, c0 = time.perf_counter(), time.process_time()
        encoded = encode(batch)
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        tokens += sum(len(e.ids) for e in encoded) + len(batch)  # + EOS per document, as in the shards

    for doc in DocumentStream(corpus_files(corpus)):
        batch.append(doc)
        chars += len(doc)
        docs += 1
        if chars >= BATCH_CHARS:
            run(batch)
            batch, chars = [], 0
    if batch:
        run(batch)
    return {"tokens": tokens, "documents": docs, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "tokens_per_cpu_s": tokens / cpu}


def measure_ceiling(corpus: Path, tokenizer: str) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true")
    out = subprocess.run([sys.executable, __file__, "--ceiling", str(corpus), "--tokenizer", tokenizer], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_prepare(corpus: Path, out: Path, tokenizer: str, workers: int) -> dict:
    import psutil

    cmd = [sys.executable, "-m", "sparselm", "data", "prepare", "--corpus", str(corpus), "--tokenizer", tokenizer,
           "--workers", str(workers), "--out", str(out), "--no-progress"]
    t0, cpu0 = time.perf_counter(), _children_cpu()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, load = [0], [os.getloadavg()[0]]

    def sample():
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.Error:
                continue
            peak[0], load[0] = max(peak[0], rss), max(load[0], os.getloadavg()[0])
            time.sleep(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    log, _ = proc.communicate()
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0  # the workers' CPU too: each level waits for its children
    watcher.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{log}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"tokens": manifest["train_tokens"] + manifest["val_tokens"], "documents": sum(manifest["documents"].values()),
            "tokens_per_s": manifest["prepared"]["tokens_per_s"], "wall_s": wall, "peak_rss": peak[0],
            "tokens_per_cpu_s": (manifest["train_tokens"] + manifest["val_tokens"]) / cpu, "load": load[0]}


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def generate(root: Path, size_mb: float, seed: int = 0, files: int = 4) -> dict[str, Path]:
    """The shipped documents, reshuffled each round, until ``size_mb`` MB of text; as .jsonl.gz and .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sparselm.data import read_documents
    from sparselm.data.paths import default_corpus

    docs = list(read_documents(default_corpus()))
    rng = random.Random(seed)
    target, per_file = int(size_mb * 1e6), int(size_mb * 1e6) // files + 1
    out = {"jsonl.gz": root / "jsonl.gz", "parquet": root / "parquet"}
    for d in out.values():
        d.mkdir(parents=True)
    written, index, rows = 0, 0, []
    gz = pw = None

    def open_part(i):
        return (gzip.open(out["jsonl.gz"] / f"part-{i:04d}.jsonl.gz", "wt", encoding="utf-8", compresslevel=6),
                pq.ParquetWriter(out["parquet"] / f"part-{i:04d}.parquet", pa.schema([("id", pa.int64()), ("text", pa.string())])))

    def flush_rows():
        if rows:
            pw.write_table(pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows]}))
            rows.clear()

    part = -1
    while written < target:
        order = list(range(len(docs)))
        rng.shuffle(order)
        for i in order:
            if written // per_file != part:
                if gz is not None:
                    flush_rows()
                    gz.close()
                    pw.close()
                part = written // per_file
                gz, pw = open_part(part)
            doc = docs[i]
            gz.write(json.dumps({"id": index, "text": doc}) + "\n")
            rows.append((index, doc))
            if len(rows) >= 8192:
                flush_rows()
            index += 1
            written += len(doc.encode("utf-8"))
            if written >= target:
                break
    flush_rows()
    gz.close()
    pw.close()
    return out


def disk_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", type=float, nargs="*", default=[250, 1000], help="generated corpus sizes, MB of text")
    ap.add_argument("--formats", nargs="*", default=["jsonl.gz", "parquet"], choices=["jsonl.gz", "parquet"])
    ap.add_argument("--memory-formats", nargs="*", default=None,
                    help="formats run at every size but the largest (default: all)")
    ap.add_argument("--tokenizer", default="gpt2")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--workdir", default=None, help="where to generate corpora (default: a temporary folder)")
    ap.add_argument("--ceiling", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ceiling:
        print(json.dumps(ceiling(args.ceiling, args.tokenizer)))
        return

    from sparselm.data.paths import default_corpus

    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="sparselm-bench-", dir=args.workdir))
    rows = []

    def record(name, fmt, corpus, text_mb, ceil, res):
        if res["tokens"] != ceil["tokens"]:
            raise RuntimeError(f"{name} {fmt}: prepare wrote {res['tokens']} tokens, the ceiling counted {ceil['tokens']}")
        rows.append((name, fmt, text_mb, disk_mb(corpus), res["documents"], res["tokens"], ceil, res))
        print(f"  {name} {fmt}: {res['tokens_per_s']:,.0f} tok/s vs ceiling {ceil['tokens_per_s']:,.0f} "
              f"({res['tokens_per_s'] / ceil['tokens_per_s']:.2f}x; per CPU-s {res['tokens_per_cpu_s']:,.0f} vs "
              f"{ceil['tokens_per_cpu_s']:,.0f}), peak RSS {res['peak_rss'] / 1e6:,.0f} MB, {res['wall_s']:.0f} s, "
              f"load {res['load']:.1f}", flush=True)

    def prepare(corpus, fmt):
        res = measure_prepare(corpus, work / "out" / fmt, args.tokenizer, args.workers)
        shutil.rmtree(work / "out" / fmt)
        return res

    try:
        def bracketed(name, corpora, formats, text_mb):
            """Ceiling, each format's prepare, ceiling again; the prepares are compared with the mean ceiling."""
            before = measure_ceiling(corpora[formats[0]], args.tokenizer)
            results = [(fmt, prepare(corpora[fmt], fmt)) for fmt in formats]
            after = measure_ceiling(corpora[formats[0]], args.tokenizer)
            print(f"  ceiling {before['tokens_per_s']:,.0f} tok/s before, {after['tokens_per_s']:,.0f} after", flush=True)
            ceil = {k: (before[k] + after[k]) / 2 for k in ("tokens_per_s", "tokens_per_cpu_s")} | {"tokens": before["tokens"]}
            for fmt, res in results:
                record(name, fmt, corpora[fmt], text_mb or disk_mb(corpora[fmt]), ceil, res)

        print("shipped corpus ...", flush=True)
        bracketed("shipped", {"txt": default_corpus()}, ["txt"], None)
        memory_formats = args.memory_formats if args.memory_formats is not None else args.formats
        for size in sorted(args.sizes_mb):
            name = f"{size:g} MB"
            print(f"{name}: generating ...", flush=True)
            corpora = generate(work / name.replace(" ", ""), size)
            formats = args.formats if size == max(args.sizes_mb) else [f for f in args.formats if f in memory_formats]
            bracketed(name, corpora, formats, size)
            shutil.rmtree(work / name.replace(" ", ""))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - start

    print(f"\n{len(os.sched_getaffinity(0))} cores ({cpu_name()}), {args.workers} worker(s), tokenizer {args.tokenizer}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; benchmark wall time {total / 60:.1f} min\n")
    print("| corpus | format | text MB | on disk MB | documents | tokens | ceiling tok/s | prepare tok/s | "
          "prepare / ceiling | ceiling tok/CPU-s | prepare tok/CPU-s | prepare wall s | peak RSS MB | load |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, fmt, text_mb, disk, docs, tokens, ceil, res in rows:
        print(f"| {name} | {fmt} | {text_mb:,.0f} | {disk:,.0f} | {docs:,} | {tokens:,} | {ceil['tokens_per_s']:,.0f} | "
              f"{res['tokens_per_s']:,.0f} | {res['tokens_per_s'] / ceil['tokens_per_s']:.2f}x | "
              f"{ceil['tokens_per_cpu_s']:,.0f} | {res['tokens_per_cpu_s']:,.0f} | {res['wall_s']:,.0f} | "
              f"{res['peak_rss'] / 1e6:,.0f} | {res['load']:.1f} |")


if __name__ == "__main__":
    main()
