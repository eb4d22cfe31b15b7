"""Loader throughput from object storage vs local disk, SASRec training shape (B=128, L=200).

    python benchmarks/loader_s3.py                 # synthesises ~1M interactions
    python benchmarks/loader_s3.py --data DIR      # an existing prepared directory

Starts a real S3-API server (moto's standalone server) on a loopback port, uploads the prepared
directory to it, and reads one training epoch through ``SequenceDataModule`` from each place,
with 0 and 2 DataLoader workers. Loopback has no network latency, so the s3 figures show the
client-side cost (HTTP, request per row group), not a real network's; a remote bucket adds
its round trips per row-group read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from recforge.data import storage  # noqa: E402
from recforge.data.datamodule import SequenceDataModule  # noqa: E402


def _server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def _epoch(data_dir: str, workers: int, batch_size: int, max_len: int) -> dict[str, float]:
    start = time.perf_counter()
    dm = SequenceDataModule(
        data_dir,
        batch_format="sequence",
        batch_size=batch_size,
        max_len=max_len,
        num_workers=workers,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    setup = time.perf_counter() - start
    start = time.perf_counter()
    batches = sum(1 for _ in loader)
    seconds = time.perf_counter() - start
    return {"setup_s": setup, "seconds": seconds, "batches": batches}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="a prepared directory (default: synthesise one)")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--mean-length", type=float, default=50.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=200)
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="recforge-bench-s3-"))
    proc, endpoint = _server()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        if args.data is None:
            from recforge.data.prepare import PrepareConfig, prepare
            from recforge.data.synth import SynthConfig, generate

            files = generate(
                SynthConfig(
                    out=str(tmp / "raw"),
                    users=args.users,
                    items=args.items,
                    mean_length=args.mean_length,
                )
            )["files"]
            data = tmp / "prepared"
            prepare(PrepareConfig(input=[files["interactions"]], out=str(data)))
        else:
            data = Path(args.data)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        storage.upload_directory(data, "s3://bench/prepared", last="manifest.json")
        manifest = SequenceDataModule(str(data)).manifest
        print(
            f"{manifest['users']:,} users, {manifest['items']:,} items, "
            f"{manifest['interactions']:,} interactions; SASRec train B={args.batch_size}, "
            f"L={args.max_len}; S3 at {endpoint} (moto, loopback)\n"
        )
        header = f"{'source':<8} {'workers':>7} {'setup s':>8} {'epoch s':>8} {'batches/s':>10}"
        print(header)
        print("-" * len(header))
        for workers in (0, 2):
            for name, location in (("local", str(data)), ("s3", "s3://bench/prepared")):
                r = _epoch(location, workers, args.batch_size, args.max_len)
                print(
                    f"{name:<8} {workers:>7} {r['setup_s']:>8.2f} {r['seconds']:>8.2f} "
                    f"{r['batches'] / r['seconds']:>10.1f}"
                )
    finally:
        proc.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
