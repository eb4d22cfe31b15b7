"""Loader throughput: Parquet row groups -> batch tensors, in one process (num_workers=0).

    python benchmarks/loader.py             # synthesises ~1M interactions, prepares them, measures
    python benchmarks/loader.py --data DIR  # measures an existing prepared directory
    python benchmarks/loader.py --data DIR --startup --only "sasrec train"  # start-up only

Per configuration (SASRec B=128, L=200; two-tower B=1024, H=50; training and validation): the
median over ``--repeats`` epochs, each a fresh shuffle whose windows are read again.
``examples/s`` counts real rows (weight 1); ``interactions/s`` counts the interactions a pass
consumes as training signal: the positions with a next-item target for SASRec training
(``sum(lengths)``), one per example otherwise.

``--startup``: per configuration, only ``setup("fit")`` (which scans the ``length`` column of
every row group) and the first batch: their seconds, the RSS before/after and the process's
peak RSS (``ru_maxrss``, cumulative over the configurations run in this process: use ``--only``
with one name for a figure of its own). GB are 10^9 bytes.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from recforge.data.datamodule import SequenceDataModule  # noqa: E402

CONFIGS: list[dict[str, Any]] = [
    {
        "name": "sasrec train",
        "model": "sasrec",
        "stage": "train",
        "batch_size": 128,
        "max_len": 200,
    },
    # The shape of configs/sasrec/tiny.yaml, to compare with its training step rate.
    {
        "name": "sasrec train (tiny)",
        "model": "sasrec",
        "stage": "train",
        "batch_size": 64,
        "max_len": 20,
    },
    {
        "name": "sasrec validate",
        "model": "sasrec",
        "stage": "validate",
        "batch_size": 256,
        "max_len": 200,
    },
    {
        "name": "two-tower train",
        "model": "two_tower",
        "stage": "train",
        "batch_size": 1024,
        "history_len": 50,
    },
    {
        "name": "two-tower validate",
        "model": "two_tower",
        "stage": "validate",
        "batch_size": 1024,
        "history_len": 50,
    },
]


def make_dataset(root: Path, users: int, items: int, mean_length: float, seed: int) -> Path:
    """Synthetic interactions with item and user features, through ``data prepare``."""
    from recforge.data.prepare import PrepareConfig, prepare
    from recforge.data.synth import SynthConfig, generate

    files = generate(
        SynthConfig(
            out=str(root / "raw"),
            users=users,
            items=items,
            mean_length=mean_length,
            max_length=1000,
            seed=seed,
        )
    )["files"]
    prepare(
        PrepareConfig(
            input=[files["interactions"]],
            out=str(root / "prepared"),
            item_features=files["item_features"],
            user_features=files["user_features"],
        )
    )
    return root / "prepared"


def _datamodule(data_dir: str, config: dict[str, Any], shuffle_window: int) -> SequenceDataModule:
    return SequenceDataModule(
        data_dir,
        batch_format="sequence" if config["model"] == "sasrec" else "history",
        batch_size=config["batch_size"],
        eval_batch_size=config["batch_size"],
        max_len=config.get("max_len", 50),
        history_len=config.get("history_len", 50),
        shuffle_window=shuffle_window,
    )


def _rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def startup(data_dir: str, config: dict[str, Any], shuffle_window: int) -> dict[str, float]:
    """Seconds and RSS of setup("fit") and of the first batch of the configuration's stage."""
    rss0 = _rss_gb()
    dm = _datamodule(data_dir, config, shuffle_window)
    start = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - start
    rss1 = _rss_gb()
    start = time.perf_counter()
    loader = dm.train_dataloader() if config["stage"] == "train" else dm.val_dataloader()
    next(iter(loader))
    first_s = time.perf_counter() - start
    return {
        "setup_s": setup_s,
        "first_batch_s": first_s,
        "rss_before_gb": rss0,
        "rss_after_setup_gb": rss1,
        "rss_after_batch_gb": _rss_gb(),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }


def measure(
    data_dir: str, config: dict[str, Any], shuffle_window: int, repeats: int
) -> dict[str, float]:
    stage = config["stage"]
    dm = _datamodule(data_dir, config, shuffle_window)
    start = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - start
    loader = dm.train_dataloader() if stage == "train" else dm.val_dataloader()
    times = []
    for epoch in range(repeats):
        loader.sampler.set_epoch(epoch)
        batches = examples = interactions = 0
        start = time.perf_counter()
        for batch in loader:
            real = int((batch["weight"] > 0).sum())
            batches += 1
            examples += real
            interactions += int(batch["lengths"].sum()) if "target_ids" in batch else real
        times.append(time.perf_counter() - start)
    return {
        "setup_s": setup_s,
        "seconds": statistics.median(times),
        "batches": batches,
        "examples": examples,
        "interactions": interactions,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="an existing prepared directory (default: synthesise one)")
    parser.add_argument("--users", type=int, default=20_000, help="synthetic users")
    parser.add_argument("--items", type=int, default=20_000, help="synthetic items")
    parser.add_argument(
        "--mean-length", type=float, default=50.0, help="synthetic mean sequence length"
    )
    parser.add_argument(
        "--shuffle-window", type=int, default=1_000_000, help="examples shuffled together"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="epochs per configuration; the median is shown"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", nargs="+", choices=[c["name"] for c in CONFIGS], help="configurations to run"
    )
    parser.add_argument(
        "--startup", action="store_true", help="only setup() and the first batch (see above)"
    )
    args = parser.parse_args(argv)
    configs = [c for c in CONFIGS if args.only is None or c["name"] in args.only]

    tmp = None
    if args.data is None:
        tmp = Path(tempfile.mkdtemp(prefix="recforge-bench-"))
        start = time.perf_counter()
        data_dir = str(make_dataset(tmp, args.users, args.items, args.mean_length, args.seed))
        print(f"synthesised and prepared in {time.perf_counter() - start:.1f} s: {data_dir}")
    else:
        data_dir = args.data
    try:
        manifest = SequenceDataModule(data_dir).manifest
        total = sum(
            manifest.get("split_counts", {}).get(k, 0)
            for k in ("train_interactions", "val_interactions", "test_interactions")
        )
        print(
            f"{manifest['users']:,} users, {manifest['items']:,} items"
            + (f", {total:,} interactions" if total else "")
            + "; num_workers=0, one process\n"
        )
        if args.startup:
            print(
                "| configuration | B | setup s | first batch s | RSS before GB "
                "| after setup GB | after batch GB | peak RSS GB |\n"
                "|---|---:|---:|---:|---:|---:|---:|---:|"
            )
            for config in configs:
                r = startup(data_dir, config, args.shuffle_window)
                print(
                    f"| {config['name']} | {config['batch_size']} | {r['setup_s']:.2f} | "
                    f"{r['first_batch_s']:.2f} | {r['rss_before_gb']:.2f} | "
                    f"{r['rss_after_setup_gb']:.2f} | {r['rss_after_batch_gb']:.2f} | "
                    f"{r['peak_rss_gb']:.2f} |",
                    flush=True,
                )
            return
        header = (
            f"{'configuration':<20} {'B':>5} {'setup s':>8} {'pass s':>8} {'batches':>8} "
            f"{'batches/s':>10} {'examples/s':>11} {'interactions/s':>15}"
        )
        print(header)
        print("-" * len(header))
        for config in configs:
            r = measure(data_dir, config, args.shuffle_window, args.repeats)
            print(
                f"{config['name']:<20} {config['batch_size']:>5} "
                f"{r['setup_s']:>8.2f} {r['seconds']:>8.2f} "
                f"{r['batches']:>8,} {r['batches'] / r['seconds']:>10,.1f} "
                f"{r['examples'] / r['seconds']:>11,.0f} "
                f"{r['interactions'] / r['seconds']:>15,.0f}"
            )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
