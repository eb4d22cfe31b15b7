"""Serving latency: `Recommender.recommend` (onnxruntime + exact or HNSW top-k) vs the PyTorch
module on the same inputs, and a bounded HTTP load test with a hot reload.

    python benchmarks/serve_latency.py [--large 1000000] [--repeats 200] [--load-seconds 30]

The model is SASRec with the `configs/sasrec/ml1m.yaml` shape (D=64, 2 layers, L=200, 3,416
items) and random weights (latency does not depend on training); histories are full length
(L=200). Catalogues: the model's own 3,416 items, and ``--large`` synthetic item vectors
(Gaussian) searched exactly and through faiss HNSW, with HNSW's recall@10 against exact.
The load test runs `recforge serve` on loopback with 20 concurrent clients for
``--load-seconds``, reloading the model once halfway. Prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
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

from models.sasrec import SASRec, SASRecConfig  # noqa: E402
from data.readers import file_sha256  # noqa: E402
from trainer.export import SASRecUserEncoder, _export_onnx  # noqa: E402


def build_artifact(out: Path, encoder: SASRecUserEncoder, item_vectors: np.ndarray, max_len: int) -> None:
    out.mkdir(parents=True)
    np.save(out / "item_embeddings.npy", item_vectors.astype(np.float32))
    ids = np.arange(1, len(item_vectors) + 1)
    pq.write_table(pa.table({"item_idx": ids.astype(np.int32), "item_id": ids, "count": np.ones(len(ids), np.int64)}),
                   out / "items.parquet")
    _export_onnx(encoder, torch.randint(1, 100, (2, 8)), out / "model.onnx")
    manifest = {"format": 1, "kind": "sasrec", "num_items": len(item_vectors), "dim": item_vectors.shape[1],
                "max_len": max_len, "opset": 18,
                "inputs": [{"name": "item_ids", "dtype": "int64", "shape": ["batch", "length"]}],
                "outputs": [{"name": "user_vector", "dtype": "float32", "shape": ["batch", item_vectors.shape[1]]}]}
    manifest["files"] = {n: file_sha256(out / n) for n in ("model.onnx", "item_embeddings.npy", "items.parquet")}
    (out / "manifest.json").write_text(json.dumps(manifest))


def percentiles(samples: list[float]) -> tuple[float, float]:
    a = np.array(samples) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def time_calls(fn, repeats: int) -> tuple[float, float]:
    for _ in range(5):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return percentiles(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", type=int, default=1_000_000, help="synthetic catalogue size")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--load-seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    from serve.recommender import Recommender

    config = SASRecConfig(num_items=3416, max_len=200, dim=64, num_layers=2, num_heads=1, dropout=0.0)
    sasrec = SASRec(config).eval()
    encoder = SASRecUserEncoder(sasrec).eval()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "small"
        build_artifact(small, encoder, encoder.items.weight[1:].numpy(), config.max_len)
        large = Path(tmp) / "large"
        vectors = rng.standard_normal((args.large, config.dim), dtype=np.float32) / np.sqrt(config.dim)
        build_artifact(large, encoder, vectors, config.max_len)
        for catalogue, path, index in (("3.4k", small, "exact"), (f"{args.large / 1e6:g}M", large, "exact"),
                                       (f"{args.large / 1e6:g}M", large, "hnsw")):
            start = time.perf_counter()
            rec = Recommender.load(path, index=index)
            load_s = time.perf_counter() - start
            table = torch.from_numpy(rec.item_embeddings)
            for batch in (1, 64):
                hist = rng.integers(1, config.num_items + 1, (batch, config.max_len))
                requests = [{"history": h.tolist(), "k": 10, "exclude_seen": False} for h in hist]
                ids = torch.from_numpy(hist)
                ort_p50, ort_p99 = time_calls(lambda: rec.recommend_batch(requests), args.repeats if batch == 1
                                              else max(20, args.repeats // 10))

                def torch_call() -> None:
                    with torch.no_grad():
                        torch.topk(encoder(ids) @ table.T, 10)

                pt_p50, pt_p99 = time_calls(torch_call, args.repeats if batch == 1 else max(20, args.repeats // 10))
                recall = ""
                if index == "hnsw":
                    exact = Recommender.load(path, index="exact")
                    hits = sum(len(set(a.items) & set(b.items)) for a, b in
                               zip(rec.recommend_batch(requests), exact.recommend_batch(requests)))
                    recall = f"{hits / (10 * batch):.3f}"
                rows.append((catalogue, index, batch, ort_p50, ort_p99, pt_p50, pt_p99, recall, load_s))
        print("\nrecommend() latency, SASRec D=64 L=200, top-10, 1 thread (ms)")
        print(f"{'catalogue':>9} {'search':>6} {'batch':>5} | {'onnxruntime p50':>15} {'p99':>8} | "
              f"{'PyTorch p50':>11} {'p99':>8} | {'recall@10':>9} | {'load s':>6}")
        for c, i, b, o50, o99, p50, p99, r, ls in rows:
            print(f"{c:>9} {i:>6} {b:>5} | {o50:15.2f} {o99:8.2f} | {p50:11.2f} {p99:8.2f} | {r:>9} | {ls:6.1f}")
        load_test(small, args.clients, args.load_seconds)


def load_test(artifact: Path, clients: int, seconds: float) -> None:
    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("recforge")), "serve", str(artifact), "--port",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            requests.get(url + "/healthz", timeout=1)
            break
        except requests.RequestException:
            time.sleep(0.1)
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
    print(f"\nHTTP load test: {clients} clients, {total:.0f} s, history 50, k=10, one reload (HTTP {reload_status}) "
          f"halfway")
    print(f"requests: {len(latencies)}  requests/s: {len(latencies) / total:.0f}  p50: {p50:.1f} ms  p99: {p99:.1f} ms  "
          f"errors: {len(errors)}")


if __name__ == "__main__":
    main()
