"""Serving latency on a large catalogue: exact (blocked matrix product + top-k) against the
artifact's HNSW index, with recall@10 of HNSW against exact on the same requests.

    python benchmarks/serve_ann.py ARTIFACT PREPARED [--requests 1000] [--history 50]
        [--ef-search 512] [--threads 1] [--json out.json]

ARTIFACT is a `recforge export --ann hnsw` directory (e.g. `benchmarks/scale.py`'s
`WORKDIR/sasrec-1000000/artifact`), PREPARED the prepared dataset it was trained on. Requests
are the last ``--history`` items of ``--requests`` users drawn at random (seed 0) from the
prepared sequences, sent one at a time through `Recommender.recommend(history=..., k=10)` in
this process: the model's own latency (ONNX user encoder + search + seen-item filtering), no
HTTP. Both indexes answer the same requests; recall@10 is |HNSW top-10 ∩ exact top-10| / 10,
averaged. Prints p50/p90/p99/mean per index and writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def histories(prepared: Path, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` users' last ``length`` item ids, users drawn uniformly without replacement."""
    items = pq.read_table(prepared / "items.parquet", columns=["item_id"]).column(0).to_numpy()
    seqs = pq.ParquetFile(prepared / "sequences.parquet")
    rows = np.sort(np.random.default_rng(seed).choice(seqs.metadata.num_rows, n, replace=False))
    picked: list[list[int]] = []
    start = 0
    for group in range(seqs.num_row_groups):
        count = seqs.metadata.row_group(group).num_rows
        wanted = rows[(rows >= start) & (rows < start + count)] - start
        if len(wanted):
            column = seqs.read_row_group(group, columns=["item_idx"]).column(0).to_pylist()
            picked += [[int(items[i - 1]) for i in column[r][-length:]] for r in wanted]
        start += count
    return picked


def measure(rec, requests: list[list[int]]) -> tuple[dict[str, float], list[list]]:
    for history in requests[:20]:  # warm-up: ONNX session, page cache of the embeddings/index
        rec.recommend(history=history, k=10)
    times, results = [], []
    for history in requests:
        start = time.perf_counter()
        out = rec.recommend(history=history, k=10)
        times.append((time.perf_counter() - start) * 1000)
        results.append(list(out.items))
    t = np.asarray(times)
    return {
        "p50_ms": float(np.percentile(t, 50)),
        "p90_ms": float(np.percentile(t, 90)),
        "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": float(t.mean()),
    }, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("prepared", type=Path)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--ef-search", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from recforge.serve.recommender import Recommender

    requests = histories(args.prepared, args.requests, args.history)
    report: dict = {"requests": len(requests), "history": args.history, "threads": args.threads}
    answers = {}
    for index in ("exact", "hnsw"):
        start = time.perf_counter()
        rec = Recommender.load(
            args.artifact, threads=args.threads, index=index, ef_search=args.ef_search
        )
        load_s = time.perf_counter() - start
        stats, answers[index] = measure(rec, requests)
        report[index] = {"load_seconds": round(load_s, 2), **stats}
        report["items"] = rec.num_items
        del rec
    overlap = [len(set(a) & set(b)) / 10 for a, b in zip(answers["exact"], answers["hnsw"])]
    report["hnsw"]["recall@10_vs_exact"] = float(np.mean(overlap))
    report["hnsw"]["ef_search"] = args.ef_search
    print(f"{report['items']:,} items, {len(requests)} requests (history {args.history}), k=10")
    print(f"{'index':<6} {'load s':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for index in ("exact", "hnsw"):
        r = report[index]
        print(
            f"{index:<6} {r['load_seconds']:>7.2f} {r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} "
            f"{r['p99_ms']:>8.2f} {r['mean_ms']:>8.2f}"
        )
    print(f"HNSW recall@10 vs exact on these requests: {report['hnsw']['recall@10_vs_exact']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
