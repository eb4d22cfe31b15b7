"""Serving latency: `Recommender.recommend_batch` (onnxruntime + exact or HNSW top-k) vs the
PyTorch module on the same inputs, for SASRec and the two-tower user tower, float and int8; and a
bounded HTTP load test with a hot reload.

    python benchmarks/serve_latency.py [--large 1000000] [--repeats 200] [--load-seconds 30]

Models have the shapes of `configs/sasrec/ml1m_fast.yaml` (D=64, 2 layers, L=200) and
`configs/two_tower/ml1m.yaml` (D=64, H=50, learned 2-head pooling, 256-wide towers), 3,416 items,
random weights (latency does not depend on training); histories are full length (L or H).
Catalogues: the model's own 3,416 items (float, and the `--quantize int8` graph with its
recall@10 against float), and ``--large`` synthetic item vectors searched exactly and (SASRec;
HNSW latency depends on the catalogue, not on the user model) through faiss HNSW, with recall@10
against exact. PyTorch columns are the encoder plus `torch.topk` over the same catalogue (exact).
The load test runs `recforge serve` (SASRec, 3,416 items) on loopback with 20 concurrent clients
for ``--load-seconds``, reloading the model once halfway. Prints tables.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from recforge import artifact  # noqa: E402
from recforge.models.sasrec import SASRec, SASRecConfig  # noqa: E402
from recforge.models.towers import TowerConfig  # noqa: E402
from recforge.models.two_tower import TwoTower, TwoTowerConfig  # noqa: E402
from recforge.trainer.export.encoders import SASRecUserEncoder, TwoTowerUserEncoder  # noqa: E402
from recforge.trainer.export.parity import PARITY_SHAPES  # noqa: E402
from recforge.trainer.export.quantize import quantize_int8  # noqa: E402
from recforge.trainer.export.writing import created_now, write_manifest, write_onnx  # noqa: E402

NUM_ITEMS = 3416


def build_artifact(
    out: Path, encoder: torch.nn.Module, vectors: np.ndarray, int8: bool = False
) -> dict:
    """A servable artifact dir for ``encoder`` scored against ``vectors`` (N, D); returns the
    int8 report when ``int8``."""
    out.mkdir(parents=True)
    vectors = vectors.astype(np.float32)
    np.save(out / artifact.ITEM_EMBEDDINGS, vectors)
    ids = np.arange(1, len(vectors) + 1)
    pq.write_table(
        pa.table(
            {"item_idx": ids.astype(np.int32), "item_id": ids, "count": np.ones(len(ids), np.int64)}
        ),
        out / artifact.ITEMS,
    )
    pq.write_table(
        pa.table(
            {
                "user_id": [1],
                "user_idx": [1],
                "history": pa.array([[1, 2, 3]], pa.list_(pa.int32())),
            }
        ),
        out / artifact.USERS,
    )
    example = encoder.random_inputs(2, 8, torch.Generator().manual_seed(0))
    write_onnx(encoder, example, out / artifact.MODEL)
    report = {}
    if int8:
        report = quantize_int8(
            out / artifact.MODEL, out / artifact.INT8_MODEL, encoder, vectors, PARITY_SHAPES
        ).report
        os.replace(out / artifact.INT8_MODEL, out / artifact.MODEL)
    write_manifest(
        out,
        encoder,
        vectors,
        example,
        provenance=created_now("benchmarks/serve_latency.py"),
        checks={"quantization": report or None},
    )
    return report


def percentiles(samples: list[float]) -> tuple[float, float]:
    a = np.array(samples) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def time_calls(fn, repeats: int) -> tuple[float, float]:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return percentiles(samples)


def models() -> dict[str, tuple[torch.nn.Module, torch.nn.Module]]:
    torch.manual_seed(0)
    sasrec = SASRec(
        SASRecConfig(
            num_items=NUM_ITEMS, max_len=200, dim=64, num_layers=2, num_heads=1, dropout=0.0
        )
    ).eval()
    two_tower = TwoTower(
        TwoTowerConfig(
            num_items=NUM_ITEMS,
            dim=64,
            out_dim=64,
            history_len=50,
            pooling="learned",
            decay=0.9,
            pooling_heads=2,
            item_tower=TowerConfig([256], 0.0),
            user_tower=TowerConfig([256], 0.0),
        )
    ).eval()
    return {
        "SASRec": (sasrec, SASRecUserEncoder(sasrec).eval()),
        "two-tower": (two_tower, TwoTowerUserEncoder(two_tower).eval()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--large", type=int, default=1_000_000, help="synthetic catalogue size")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--load-seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--ef-search", default="128,512,2048", help="HNSW efSearch values to sweep")
    parser.add_argument(
        "--cell-seconds",
        type=float,
        default=10.0,
        help="seconds per HTTP throughput cell (benchmarks/serve_throughput.py; 0: none)",
    )
    parser.add_argument(
        "--only-throughput",
        action="store_true",
        help="only the throughput tables (model vs HTTP, batching, workers)",
    )
    parser.add_argument(
        "--only-large", action="store_true", help="only the SASRec --large rows (exact, HNSW)"
    )
    args = parser.parse_args()
    ef_values = [int(x) for x in args.ef_search.split(",")]
    torch.set_num_threads(1)
    from recforge.serve.recommender import Recommender

    rng = np.random.default_rng(0)
    large = rng.standard_normal((args.large, 64), dtype=np.float32)
    large /= np.linalg.norm(
        large, axis=1, keepdims=True
    )  # unit vectors: cosine scores, as the two-tower's
    big = f"{args.large / 1e6:g}M"
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only_throughput:
            throughput(Path(tmp), rng, args.cell_seconds)
            return
        for name, (_network, encoder) in models().items():
            if args.only_large and name != "SASRec":
                continue
            own = encoder.item_vectors()
            paths = {}
            for label, vectors, int8 in (
                ("float", own, False),
                ("int8", own, True),
                ("large", large, False),
            ):
                paths[label] = Path(tmp) / f"{name}-{label}"
                start = time.perf_counter()
                report = build_artifact(paths[label], encoder, vectors, int8=int8)
                if int8:
                    notes.append(
                        f"{name} int8: {report['bytes_float']} -> {report['bytes_int8']} bytes, "
                        f"max |diff| vs PyTorch {report['max_abs_diff_vs_pytorch']:.2e}, "
                        f"parity-case recall@10 vs float {report['recall@10_vs_float']:.3f} "
                        f"({time.perf_counter() - start:.0f} s)"
                    )
            cases = [
                ("3.4k", "float", paths["float"], "exact"),
                ("3.4k", "int8", paths["int8"], "exact"),
                (big, "float", paths["large"], "exact"),
            ]
            if args.only_large:
                cases = cases[2:]
            if name == "SASRec":
                cases.append((big, "float", paths["large"], "hnsw"))
            reference = {}
            for catalogue, precision, path, index in cases:
                start = time.perf_counter()
                rec = Recommender.load(path, index=index)
                load_s = time.perf_counter() - start
                table = torch.from_numpy(rec.item_embeddings)
                for batch, ef in [
                    (b, ef) for ef in (ef_values if index == "hnsw" else [0]) for b in (1, 64)
                ]:
                    if ef:
                        rec.ann.ef_search = ef
                    label = f"hnsw{ef}" if ef else index
                    hist = (
                        rng.integers(1, NUM_ITEMS + 1, (batch, encoder.max_length))
                        if (catalogue, batch) not in reference
                        else reference[(catalogue, batch)][0]
                    )
                    requests = [
                        {"history": h.tolist(), "k": 10, "exclude_seen": False} for h in hist
                    ]
                    repeats = args.repeats if batch == 1 else max(20, args.repeats // 10)
                    ort_p50, ort_p99 = time_calls(
                        functools.partial(rec.recommend_batch, requests), repeats
                    )
                    ids = torch.from_numpy(hist)

                    def torch_call(encoder=encoder, ids=ids, table=table) -> None:
                        with torch.no_grad():
                            torch.topk(encoder(ids) @ table.T, 10)

                    pt_p50, pt_p99 = time_calls(torch_call, repeats)
                    answers = rec.recommend_batch(requests)
                    recall = ""
                    if (
                        catalogue,
                        batch,
                    ) in reference:  # int8 or HNSW against the float, exact answers
                        hits = sum(
                            len(set(a.items) & set(b.items))
                            for a, b in zip(answers, reference[(catalogue, batch)][1])
                        )
                        recall = f"{hits / (10 * batch):.3f}"
                    else:
                        reference[(catalogue, batch)] = (hist, answers)
                    rows.append(
                        (
                            name,
                            catalogue,
                            label,
                            precision,
                            batch,
                            ort_p50,
                            ort_p99,
                            pt_p50,
                            pt_p99,
                            recall,
                            load_s,
                        )
                    )
        print(
            "\nrecommend_batch() latency, top-10, 1 thread (ms); "
            "recall@10 against float exact search"
        )
        print(
            f"{'model':>9} {'catalogue':>9} {'search':>8} {'weights':>7} {'batch':>5} | "
            f"{'onnxruntime p50':>15} {'p99':>8} | {'PyTorch p50':>11} {'p99':>8} | "
            f"{'recall@10':>9} | {'load s':>6}"
        )
        for m, c, i, w, b, o50, o99, p50, p99, r, ls in rows:
            print(
                f"{m:>9} {c:>9} {i:>8} {w:>7} {b:>5} | {o50:15.2f} {o99:8.2f} | "
                f"{p50:11.2f} {p99:8.2f} | {r:>9} | {ls:6.1f}"
            )
        for note in notes:
            print(note)
        if not args.only_large:
            load_test(Path(tmp) / "SASRec-float", args.clients, args.load_seconds)
            if args.cell_seconds > 0:
                throughput(Path(tmp), rng, args.cell_seconds)


def throughput(tmp: Path, rng: np.random.Generator, seconds: float) -> None:
    """Model vs HTTP throughput per model shape (benchmarks/serve_throughput.py), full-length
    histories (L 200 for SASRec, H 50 for the two-tower), k 10."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import serve_throughput

    for name, (_network, encoder) in models().items():
        path = tmp / f"{name}-throughput"
        if not path.exists():
            build_artifact(path, encoder, encoder.item_vectors())
        histories = rng.integers(1, NUM_ITEMS + 1, (256, encoder.max_length))
        bodies = [{"history": h.tolist(), "k": 10} for h in histories]
        serve_throughput.report(name, path, bodies, seconds)


def load_test(artifact: Path, clients: int, seconds: float) -> None:
    import requests

    from recforge.serve.local import free_port, wait_healthy

    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("recforge")),
            "serve",
            str(artifact),
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url + "/healthz", timeout_s=60, proc=server)
    latencies: list[float] = []
    errors: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()
    rng = np.random.default_rng(1)
    bodies = [{"history": rng.integers(1, 3417, 50).tolist(), "k": 10} for _ in range(64)]

    def client(n: int) -> None:
        session = requests.Session()
        i = n
        while not stop.is_set():
            start = time.perf_counter()
            try:
                r = session.post(url + "/v1/recommend", json=bodies[i % len(bodies)], timeout=30)
                ok = r.status_code == 200
            except requests.RequestException as exc:
                ok, r = False, exc
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                if not ok:
                    errors.append(str(getattr(r, "status_code", r)))
            i += clients

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds / 2)
    reload_status = requests.post(url + "/v1/admin/reload", json={}, timeout=60).status_code
    time.sleep(seconds / 2)
    stop.set()
    for t in threads:
        t.join()
    total = time.perf_counter() - start
    server.terminate()
    server.wait(timeout=20)
    p50, p99 = percentiles(latencies)
    print(
        f"\nHTTP load test: {clients} clients, {total:.0f} s, history 50, k=10, "
        f"one reload (HTTP {reload_status}) halfway"
    )
    print(
        f"requests: {len(latencies)}  requests/s: {len(latencies) / total:.0f}  "
        f"p50: {p50:.1f} ms  p99: {p99:.1f} ms  errors: {len(errors)}"
    )


if __name__ == "__main__":
    main()
