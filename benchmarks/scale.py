"""A large catalogue end to end, per catalogue size: synthetic data, bounded 2-rank CPU training
with a sampled loss, sampled evaluation, export with the HNSW index, and loading it to serve.

    python benchmarks/scale.py [--sizes 10000,100000,1000000] [--family sasrec|two_tower]
        [--steps 40] [--interactions-per-item 20] [--workdir runs/scale] [--json scale.json]

Per size N (the synthetic catalogue; the prepared one keeps the items that occur, reported):

1. ``recforge data synth --items N --interactions N x --interactions-per-item`` (Zipf item
   popularity, exponent 1.1; 30 interactions per user on average), then ``recforge data prepare``
   (leave-one-out; SASRec without features, two-tower with the synthetic item and user features);
2. ``recforge fit`` on 2 CPU ranks (gloo), ``item_table`` row-wise, ``--steps`` steps, no
   validation: SASRec (``configs/sasrec/tiny.yaml`` at D=64, L=50) with ``sampled_softmax``
   over ``--negatives`` uniform negatives shared by the step, logQ-corrected (in-batch negatives
   off: with B x L = 12,800 positions per rank they would cost ~13x the logits), or the
   two-tower model (``configs/two_tower/tiny.yaml``: in-batch + uniform negatives, logQ).
   Reported: samples/s
   (``train/samples_per_sec`` of the throughput monitor, summed over ranks), each rank's peak
   RSS (``VmHWM`` of its process, polled), and the bytes each rank holds per the plan
   (``sharding_plan.json`` ``bytes_per_rank``, all tables);
3. ``recforge test`` on 2 ranks over a fixed sample of ``--eval-users`` users
   (``--data.eval_max_users``; catalogue-chunked, item-sharded full ranking): wall seconds of
   the command (process start, model build and checkpoint load included);
4. ``recforge export --ann hnsw``: wall seconds, peak RSS, artifact bytes, and from the manifest
   the HNSW build seconds and recall@10 against exact search (1000 known users' vectors);
5. serving: ``Recommender.load`` seconds with exact search and with the saved HNSW index (not a
   rebuild), then ``--serve-requests`` single requests (50-item histories of sampled users, k=10)
   timed per index: p50/p99 ms and HNSW's recall@10 against exact on them
   (``benchmarks/serve_ann.py``, which also runs alone on any artifact).

Prints a table and writes JSON (``--json``). The machine's load matters: the figures are wall
clock on whatever cores are free.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
RECFORGE = str(Path(sys.executable).with_name("recforge"))
CONFIGS = {
    "sasrec": REPO / "configs" / "sasrec" / "tiny.yaml",
    "two_tower": REPO / "configs" / "two_tower" / "tiny.yaml",
}
LOGGER_NAME = {"sasrec": "sasrec-tiny", "two_tower": "two-tower-tiny"}


class Run:
    """A command with its process tree's peak RSS per rank (VmHWM, polled every 0.5 s)."""

    def __init__(self, args: list[str], log: Path, cwd: Path) -> None:
        self.args, self.log, self.cwd = args, log, cwd
        self.peak: dict[str, int] = {}

    def _poll(self, root: int, done: threading.Event) -> None:
        while not done.is_set():
            for pid, rank in _tree(root).items():
                hwm = _vm_hwm(pid)
                if hwm is not None:
                    self.peak[rank] = max(self.peak.get(rank, 0), hwm)
            done.wait(0.5)

    def __call__(self) -> float:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        start = time.perf_counter()
        with open(self.log, "a") as out:
            out.write(f"\n$ {' '.join(self.args)}\n")
            out.flush()
            proc = subprocess.Popen(
                self.args, cwd=self.cwd, env=env, stdout=out, stderr=subprocess.STDOUT
            )
            done = threading.Event()
            poller = threading.Thread(target=self._poll, args=(proc.pid, done), daemon=True)
            poller.start()
            rc = proc.wait()
            done.set()
            poller.join()
        seconds = time.perf_counter() - start
        if rc != 0:
            tail = self.log.read_text()[-3000:]
            raise RuntimeError(f"{' '.join(self.args[:3])} failed (rc {rc}):\n{tail}")
        return seconds


def _tree(root: int) -> dict[int, str]:
    """pid -> rank label of ``root`` (rank 0) and its descendants that carry LOCAL_RANK."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, stack = {root: "rank0"}, [root]
    while stack:
        for child in children.get(stack.pop(), []):
            stack.append(child)
            try:
                env = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            ranks = [e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"LOCAL_RANK=")]
            if ranks:
                out[child] = f"rank{ranks[0]}"
    return out


def _vm_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def run_size(n: int, args: argparse.Namespace, work: Path, log: Path) -> dict[str, Any]:
    root = work / f"{args.family}-{n}"
    root.mkdir(parents=True, exist_ok=True)
    raw, data = root / "raw", root / "prepared"
    result: dict[str, Any] = {"catalogue": n, "family": args.family}
    interactions = n * args.interactions_per_item
    if not (data / "manifest.json").is_file():
        if not (raw / "synth.json").is_file():
            result["synth_seconds"] = Run(
                [
                    RECFORGE,
                    "data",
                    "synth",
                    "--out",
                    str(raw),
                    "--items",
                    str(n),
                    "--interactions",
                    str(interactions),
                    "--seed",
                    "0",
                    "--overwrite",
                ],
                log,
                root,
            )()
        prepare = [
            RECFORGE,
            "data",
            "prepare",
            "--input",
            str(raw / "interactions.parquet"),
            "--format",
            "parquet",
            "--out",
            str(data),
            "--overwrite",
        ]
        if args.family == "two_tower":
            prepare += [
                "--item-features",
                str(raw / "item_features.parquet"),
                "--user-features",
                str(raw / "user_features.parquet"),
            ]
        else:
            prepare += ["--no-features"]
        result["prepare_seconds"] = Run(prepare, log, root)()
    manifest = json.loads((data / "manifest.json").read_text())
    counts = manifest.get("counts") or manifest.get("stats") or {}
    result["items"] = manifest.get("items") or counts.get("items")
    result["users"] = manifest.get("users") or counts.get("users")
    result["interactions"] = interactions

    runs = root / "runs"
    common = [
        "--config",
        str(CONFIGS[args.family]),
        "--data.data_dir",
        str(data),
        "--data.synthesize",
        "null",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.default_root_dir",
        str(runs),
        "--trainer.logger.init_args.save_dir",
        str(runs),
        "--mlflow.enabled",
        "false",
        "--data.batch_size",
        str(args.batch_size),
        "--data.eval_max_users",
        str(args.eval_users),
    ]
    if args.family == "sasrec":
        common += [
            "--model.init_args.model.dim",
            "64",
            "--model.init_args.model.max_len",
            "50",
            "--model.init_args.model.loss",
            "sampled_softmax",
            "--model.init_args.model.num_negatives",
            str(args.negatives),
            "--model.init_args.model.in_batch_negatives",
            "false",
            "--model.init_args.model.logq_correction",
            "true",
        ]
    else:
        common += [
            "--model.init_args.model.num_negatives",
            str(args.negatives),
            "--model.init_args.model.in_batch_negatives",
            "true",
            "--model.init_args.model.logq_correction",
            "true",
        ]
    version = f"{LOGGER_NAME[args.family]}"
    for old in glob.glob(str(runs / version / "version_*")):
        import shutil

        shutil.rmtree(old)
    fit = Run(
        [
            RECFORGE,
            "fit",
            *common,
            "--trainer.max_epochs",
            "1",
            "--trainer.max_steps",
            str(args.steps),
            "--trainer.limit_val_batches",
            "0",
            "--trainer.num_sanity_val_steps",
            "0",
            "--test_after_fit",
            "false",
            "--early_stopping.strict",
            "false",
        ],
        log,
        root,
    )
    result["fit_seconds"] = fit()
    result["fit_peak_rss"] = dict(sorted(fit.peak.items()))
    run_dir = Path(sorted(glob.glob(str(runs / version / "version_*")))[-1])
    result["samples_per_sec"] = _metric(run_dir / "metrics.csv", "train/samples_per_sec")
    plans = glob.glob(str(run_dir / "**" / "sharding_plan.json"), recursive=True) or glob.glob(
        str(runs / "**" / "sharding_plan.json"), recursive=True
    )
    if plans:
        plan = json.loads(Path(plans[0]).read_text())  # {table: {..., bytes_per_rank}}
        per_rank: dict[str, int] = {}
        for spec in plan.values():
            for rank, b in sorted((spec.get("bytes_per_rank") or {}).items()):
                per_rank[f"rank{rank}"] = per_rank.get(f"rank{rank}", 0) + int(b)
        result["plan_bytes_per_rank"] = per_rank
        result["plan"] = {
            name: {"sharding_type": spec.get("sharding_type"), **spec.get("bytes_per_rank", {})}
            for name, spec in plan.items()
        }
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    test = Run(
        [
            RECFORGE,
            "test",
            *common,
            "--ckpt_path",
            str(ckpt),
            "--trainer.limit_test_batches",
            "1.0",
        ],
        log,
        root,
    )
    result["eval_seconds"] = test()
    result["eval_peak_rss"] = dict(sorted(test.peak.items()))
    metrics = glob.glob(str(runs / "**" / "test_metrics.json"), recursive=True)
    if metrics:
        m = json.loads(Path(sorted(metrics, key=os.path.getmtime)[-1]).read_text())
        result["eval_users"] = m.get("users_evaluated")
        result["eval_users_eligible"] = m.get("users_eligible")
        result["test_ndcg@10_filtered"] = (m.get("metrics") or {}).get("ndcg@10_filtered")

    out = root / "artifact"
    export = Run(
        [
            RECFORGE,
            "export",
            "--checkpoint",
            str(ckpt),
            "--out",
            str(out),
            "--ann",
            "hnsw",
            "--overwrite",
        ],
        log,
        root,
    )
    result["export_seconds"] = export()
    result["export_peak_rss"] = export.peak.get("rank0")
    result["artifact_bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    result["artifact_files"] = {f.name: f.stat().st_size for f in out.iterdir() if f.is_file()}
    ann = json.loads((out / "manifest.json").read_text())["ann"]
    result["ann"] = ann

    from serve_ann import histories, measure

    from recforge.serve.recommender import Recommender

    requests = histories(data, args.serve_requests, 50)
    answers = {}
    for index in ("exact", "hnsw"):
        start = time.perf_counter()
        rec = Recommender.load(out, index=index)
        result[f"serve_load_{index}_seconds"] = time.perf_counter() - start
        if index == "hnsw":
            result["serve_index_source"] = "artifact" if rec.ann.source != "built" else "built"
        result[f"serve_{index}"], answers[index] = measure(rec, requests)
        del rec
    result["serve_hnsw"]["recall@10_vs_exact"] = sum(
        len(set(a) & set(b)) / 10 for a, b in zip(answers["exact"], answers["hnsw"])
    ) / len(requests)
    return result


def _metric(path: Path, name: str) -> float | None:
    if not path.is_file():
        return None
    value = None
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get(name):
                value = float(row[name])
    return value


def _pcts(stats: dict[str, float]) -> str:
    return f"{stats['p50_ms']:.1f}/{stats['p99_ms']:.1f}"


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        ("catalogue (synth items)", lambda r: f"{r['catalogue']:,}"),
        ("items (prepared)", lambda r: f"{r.get('items') or 0:,}"),
        ("users", lambda r: f"{r.get('users') or 0:,}"),
        ("interactions", lambda r: f"{r['interactions']:,}"),
        ("train samples/s (2 ranks)", lambda r: f"{r['samples_per_sec'] or 0:,.0f}"),
        ("fit wall s", lambda r: f"{r['fit_seconds']:.0f}"),
        (
            "fit peak RSS MB rank0/rank1",
            lambda r: "/".join(_mb(v) for v in r["fit_peak_rss"].values()),
        ),
        (
            "plan MB rank0/rank1",
            lambda r: "/".join(_mb(v) for v in (r.get("plan_bytes_per_rank") or {}).values()),
        ),
        ("eval wall s (sampled users)", lambda r: f"{r['eval_seconds']:.0f}"),
        ("eval users", lambda r: f"{r.get('eval_users') or '-'}"),
        (
            "eval peak RSS MB rank0/rank1",
            lambda r: "/".join(_mb(v) for v in r["eval_peak_rss"].values()),
        ),
        ("export wall s (incl. HNSW)", lambda r: f"{r['export_seconds']:.0f}"),
        ("export peak RSS MB", lambda r: _mb(r.get("export_peak_rss"))),
        ("artifact MB", lambda r: _mb(r["artifact_bytes"])),
        ("HNSW build s", lambda r: f"{r['ann']['build_seconds']:.1f}"),
        ("HNSW recall@10 vs exact", lambda r: f"{r['ann']['recall@10_vs_exact']:.3f}"),
        ("serve load s, exact", lambda r: f"{r['serve_load_exact_seconds']:.1f}"),
        ("serve load s, saved HNSW", lambda r: f"{r['serve_load_hnsw_seconds']:.1f}"),
        ("serve p50/p99 ms, exact", lambda r: _pcts(r["serve_exact"])),
        ("serve p50/p99 ms, HNSW", lambda r: _pcts(r["serve_hnsw"])),
        ("serve recall@10 HNSW/exact", lambda r: f"{r['serve_hnsw']['recall@10_vs_exact']:.3f}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'':<{width}}  " + "  ".join(f"{r['catalogue']:>14,}" for r in results)]
    for name, cell in rows:
        values = []
        for r in results:
            try:
                values.append(f"{cell(r):>14}")
            except (KeyError, TypeError):
                values.append(f"{'-':>14}")
        lines.append(f"{name:<{width}}  " + "  ".join(values))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--family", choices=tuple(CONFIGS), default="sasrec")
    parser.add_argument("--steps", type=int, default=40, help="training steps per size")
    parser.add_argument("--batch-size", type=int, default=256, help="per rank")
    parser.add_argument("--negatives", type=int, default=1024, help="uniform negatives per step")
    parser.add_argument("--eval-users", type=int, default=10000)
    parser.add_argument(
        "--serve-requests", type=int, default=500, help="single requests timed per index"
    )
    parser.add_argument("--interactions-per-item", type=int, default=20)
    parser.add_argument("--workdir", default=str(REPO / "runs" / "scale"))
    parser.add_argument("--json", default=None, help="default: WORKDIR/scale-<family>.json")
    args = parser.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "scale.log"
    out = Path(args.json or work / f"scale-{args.family}.json")
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        print(f"[scale] {args.family} {n:,} items (log: {log})", flush=True)
        start, load = time.perf_counter(), os.getloadavg()[0]
        result = run_size(n, args, work, log)
        result["load_average_at_start"] = load
        result["load_average_at_end"] = os.getloadavg()[0]
        result["total_seconds"] = time.perf_counter() - start
        results.append(result)
        out.write_text(json.dumps(results, indent=2, default=str))
        print(table(results), flush=True)
    print(f"[scale] wrote {out}")


if __name__ == "__main__":
    main()
