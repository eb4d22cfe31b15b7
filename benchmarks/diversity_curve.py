"""The accuracy/diversity trade-off of ``diversity`` (MMR re-ranking, serve/rerank.py) for an
exported artifact on a prepared dataset's test split:

    python benchmarks/diversity_curve.py ARTIFACT PREPARED_DIR [--k 10] [--max-users 0]
        [--diversity 0,0.25,0.5,0.75]

Each test user is served through `Recommender.recommend_batch` (onnxruntime, as `recforge serve`
does) by the history before its test items (training and validation parts of the split in
``manifest.json``), with ``exclude_seen``: the artifact's stored history holds the test items too,
so users are not served by id (a two-tower model's user id and features are therefore not used).
Prints, per diversity: NDCG@k (binary relevance of the user's test items, ideal DCG over
min(k, #test items)), intra-list diversity (1 - mean pairwise cosine of the item embeddings in
the list) and the share of lists changed from diversity 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def test_users(prepared: str, max_users: int) -> list[tuple[list[int], list[int]]]:
    """(history item indexes, test item indexes) per user with test items, in user order."""
    import pyarrow.parquet as pq

    from recforge.data.layout import SEQUENCES, read_manifest, split_bounds

    split = read_manifest(prepared)["split"]
    columns = ["item_idx", "length"] + (["timestamp"] if split["type"] == "time" else [])
    seqs = pq.read_table(os.path.join(prepared, SEQUENCES), columns=columns).to_pydict()
    lengths = np.asarray(seqs["length"], dtype=np.int64)
    flat_ts = (
        np.concatenate([np.asarray(t, dtype=np.int64) for t in seqs["timestamp"]])
        if split["type"] == "time"
        else None
    )
    _, val_end = split_bounds(split, lengths, flat_ts)
    out = []
    for items, end in zip(seqs["item_idx"], val_end):
        if len(items) > end and end > 0:
            out.append((items[:end], items[end:]))
            if max_users and len(out) == max_users:
                break
    return out


def ndcg(ranked: list[int], targets: set[int], k: int) -> float:
    dcg = sum(1.0 / np.log2(r + 2) for r, i in enumerate(ranked[:k]) if i in targets)
    ideal = sum(1.0 / np.log2(r + 2) for r in range(min(k, len(targets))))
    return dcg / ideal


def curve(
    artifact: str, prepared: str, k: int, diversities: list[float], max_users: int
) -> list[dict[str, float]]:
    from recforge.serve.recommender import Recommender
    from recforge.serve.rerank import intra_list_similarity

    rec = Recommender.load(artifact)
    users = test_users(prepared, max_users)
    rows, baseline = [], None
    for d in diversities:
        start = time.perf_counter()
        lists = []
        for s in range(0, len(users), 256):
            batch = users[s : s + 256]
            requests = [
                {"history": [rec.item_ids[i - 1] for i in h], "k": k, "diversity": d}
                for h, _ in batch
            ]
            lists += [[rec.index_of[i] for i in r.items] for r in rec.recommend_batch(requests)]
        seconds = time.perf_counter() - start
        baseline = baseline or lists
        rows.append(
            {
                "diversity": d,
                "ndcg": float(np.mean([ndcg(x, set(t), k) for x, (_, t) in zip(lists, users)])),
                "ild": 1.0
                - float(
                    np.mean(
                        [
                            intra_list_similarity([i - 1 for i in x], rec.item_embeddings)
                            for x in lists
                        ]
                    )
                ),
                "changed": float(np.mean([x != b for x, b in zip(lists, baseline)])),
                "ms_per_user": 1000.0 * seconds / max(1, len(users)),
                "users": len(users),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("prepared")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--max-users", type=int, default=0, help="0: every test user")
    parser.add_argument("--diversity", default="0,0.25,0.5,0.75")
    args = parser.parse_args(argv)
    diversities = [float(x) for x in args.diversity.split(",")]
    rows = curve(args.artifact, args.prepared, args.k, diversities, args.max_users)
    print(f"{args.artifact} on {args.prepared} ({rows[0]['users']} test users, k={args.k})")
    print(f"{'diversity':>9}  {'NDCG@' + str(args.k):>8}  {'ILD':>6}  {'changed':>7}  ms/user")
    for r in rows:
        print(
            f"{r['diversity']:>9.2f}  {r['ndcg']:>8.4f}  {r['ild']:>6.4f}  "
            f"{r['changed']:>7.1%}  {r['ms_per_user']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
