"""Quality against wall-clock time: run one training config under a time budget, from scratch.

    python benchmarks/time_to_quality.py --config configs/sasrec/ml1m_fast.yaml \\
        --data runs/data/ml1m [--budget-minutes 20] [--threads 2] [--out runs/ttq/NAME] \\
        [-- extra recforge fit arguments]

It runs the real ``recforge fit`` (validation every epoch, then the test split on the best
checkpoint, as ``fit`` always does) with ``--trainer.max_time`` set to the budget and
``OMP_NUM_THREADS`` to ``--threads``, and samples the resident memory of the whole process tree
every 0.2 s. The budget covers training and validation; the final test pass is timed
separately. Prints, per validation epoch, the elapsed wall time, validation NDCG@10 and HR@10
(seen items filtered) and the RSS at that moment; then the test figures, the fit and test wall
times and the peak RSS. Everything also goes to ``OUT/time_to_quality.json``.

Elapsed times are those at which each validation row reaches ``metrics.csv`` (the CSV logger is
told to flush on every write), so they include the validation pass and are at most one poll
(0.2 s) late. The machine should be otherwise idle; the load average at start and end is
printed so that a reader can judge.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
RECFORGE = str(Path(sys.executable).with_name("recforge"))
NDCG, HR = "ndcg@10_filtered", "hr@10_filtered"


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of ``proc`` and all its descendants (DataLoader workers included)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def budget_string(minutes: float) -> str:
    total = int(round(minutes * 60))
    return f"00:{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


def run(args: argparse.Namespace, extra: list[str]) -> dict:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        RECFORGE,
        "fit",
        "--config",
        str(Path(args.config).resolve()),
        "--data.data_dir",
        str(Path(args.data).resolve()),
        "--trainer.max_time",
        budget_string(args.budget_minutes),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--trainer.logger.init_args.flush_logs_every_n_steps",
        "1",
        "--mlflow.enabled",
        "false",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    load_start = os.getloadavg()
    log_path = out / "fit.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        peak, peak_at, trace = 0, 0.0, []
        seen: dict[str, float] = {}
        evals: list[dict] = []
        metrics_csv: Path | None = None
        test_started: float | None = None
        while proc.poll() is None:
            rss = tree_rss(ps)
            now = time.perf_counter() - start
            if rss > peak:
                peak, peak_at = rss, now
            if not trace or now - trace[-1][0] >= 1.0:
                trace.append((round(now, 1), round(rss / 1e9, 3)))
            if metrics_csv is None:
                found = sorted(out.glob("*/version_*/metrics.csv"))
                metrics_csv = found[-1] if found else None
            for row in read_rows(metrics_csv) if metrics_csv else []:
                key = row.get("epoch", "")
                if row.get(f"val/{NDCG}") and key not in seen:
                    seen[key] = now
                    evals.append(
                        {
                            "epoch": int(key),
                            "elapsed_s": round(now, 1),
                            "val_ndcg10": float(row[f"val/{NDCG}"]),
                            "val_hr10": float(row[f"val/{HR}"]),
                            "rss_gb": round(rss / 1e9, 2),
                        }
                    )
                    print(
                        f"epoch {key:>4}  {now:7.0f} s  val NDCG@10 {evals[-1]['val_ndcg10']:.4f}"
                        f"  HR@10 {evals[-1]['val_hr10']:.4f}  RSS {rss / 1e9:.2f} GB",
                        flush=True,
                    )
            if test_started is None and "testing " in log_path.read_text(errors="replace"):
                test_started = now
            time.sleep(0.2)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"recforge fit failed (exit {proc.returncode}); {log_path}:\n{tail}")
    rows = read_rows(metrics_csv) if metrics_csv else []
    test = next((r for r in rows if r.get(f"test/{NDCG}")), None)
    if test is None:
        raise SystemExit(f"no test metrics in {metrics_csv}; see {log_path}")
    best = max(evals, key=lambda e: e["val_ndcg10"]) if evals else None
    return {
        "command": cmd,
        "threads": args.threads,
        "budget_minutes": args.budget_minutes,
        "validations": evals,
        "best_validation": best,
        "test_ndcg10": float(test[f"test/{NDCG}"]),
        "test_hr10": float(test[f"test/{HR}"]),
        "fit_wall_s": round(test_started if test_started is not None else wall, 1),
        "test_wall_s": round(wall - test_started, 1) if test_started is not None else None,
        "total_wall_s": round(wall, 1),
        "peak_rss_gb": round(peak / 1e9, 2),
        "peak_rss_at_s": round(peak_at, 1),
        "rss_trace": trace,  # (elapsed s, GB) about once a second: where the peaks fall
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "metrics_csv": str(metrics_csv),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True, help="a recforge fit config")
    p.add_argument("--data", required=True, help="a prepared data directory")
    p.add_argument("--budget-minutes", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the run")
    p.add_argument("--out", default=None, help="run directory (default runs/ttq/<config name>)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(REPO / "runs" / "ttq" / Path(args.config).stem)
    result = run(args, extra)
    out = Path(args.out) / "time_to_quality.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    best = result["best_validation"] or {}
    print(
        f"\nbest validation NDCG@10 {best.get('val_ndcg10', float('nan')):.4f} at epoch "
        f"{best.get('epoch')} ({best.get('elapsed_s')} s)\n"
        f"test NDCG@10 {result['test_ndcg10']:.4f}  HR@10 {result['test_hr10']:.4f} "
        f"(seen items filtered, full ranking)\n"
        f"fit {result['fit_wall_s']} s (budget {args.budget_minutes:g} min), test "
        f"{result['test_wall_s']} s, peak RSS {result['peak_rss_gb']} GB (at "
        f"{result['peak_rss_at_s']} s), "
        f"{args.threads} threads, load average {result['load_average_start'][0]:.1f} -> "
        f"{result['load_average_end'][0]:.1f}\nwritten {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
