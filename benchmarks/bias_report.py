"""Bias and filter-bubble report of SASRec and two-tower on MovieLens-1M with user features
(issue 17 item 6; the metrics are defined in docs/architecture.md §7).

    python benchmarks/bias_report.py [--src ../shared/data/ml-1m-features] [--out runs/bias]
    python benchmarks/bias_report.py --tiny        # the tiny synthetic configs: a smoke run

It prepares the RecBole ML-1M files with features (item `genre` as a list; user `gender`, `age`,
`occupation` as categories), runs `recforge fit` (then its test) with each family's ML-1M config
and `model.evaluation.group_by: [gender, age, occupation]`, and prints, per family, the bias
report (gini, coverage, novelty, intra-list diversity, calibration KL, popularity lift) and
NDCG@10/HR@10 (filtered) per group value with the max/min ratio between values. The test
reports stay in `<out>/<family>/.../test_metrics.json` (and `<out>/bias_report.json`).
`--tiny` runs both families on the two-tower tiny config's synthetic data (user features
`age_bucket`, `country`) for a few epochs instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECFORGE = [sys.executable, "-m", "recforge"]
EVAL = "--model.init_args.evaluation"
ML1M_GROUPS = ["gender", "age", "occupation"]
TINY_GROUPS = ["age_bucket", "country"]
BIAS_NAMES = ["gini", "coverage", "novelty", "ild", "calibration_kl", "popularity_lift"]


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}) after {time.perf_counter() - start:.0f} s: see {log}")
    print(f"  done in {time.perf_counter() - start:.0f} s (log {log})", flush=True)


def prepare(src: Path, out: Path, logs: Path) -> None:
    if (out / "manifest.json").is_file():
        return
    run(
        [
            *RECFORGE,
            "data",
            "prepare",
            "--input",
            str(src / "ml-1m.inter"),
            "--format",
            "recbole",
            "--out",
            str(out),
            "--item-feature-columns",
            "genre",
            "--user-feature-columns",
            ",".join(ML1M_GROUPS),
            "--list-columns",
            "genre",
            "--categorical-columns",
            "age,occupation",
        ],
        logs / "prepare.log",
    )


def fit(family: str, config: Path, data: Path, out: Path, groups: list[str], extra: list[str]):
    save = out / family
    run(
        [
            *RECFORGE,
            "fit",
            "--config",
            str(config),
            "--data.data_dir",
            str(data),
            "--trainer.logger.init_args.save_dir",
            str(save),
            "--trainer.default_root_dir",
            str(save),
            f"{EVAL}.group_by",
            json.dumps(groups),
            "--mlflow.tracking_uri",
            f"sqlite:///{out / 'mlflow.db'}",
            *extra,
        ],
        out / f"{family}.log",
    )
    report = max(save.rglob("test_metrics.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(report.read_text())


def show(family: str, report: dict, groups: list[str]) -> dict:
    metrics, bias = report["metrics"], report["bias"]
    k = bias["k"]
    print(f"\n== {family}: {report.get('users_evaluated')} test users, top-{k} (filtered)")
    print(
        f"   ndcg@{k} {metrics[f'ndcg@{k}_filtered']:.4f}  hr@{k} {metrics[f'hr@{k}_filtered']:.4f}"
    )
    print(
        f"   diversity by {bias['diversity_basis']}, calibration by {bias['calibration_category']}"
    )
    summary = {"ndcg": metrics[f"ndcg@{k}_filtered"], "hr": metrics[f"hr@{k}_filtered"]}
    for name in BIAS_NAMES:
        value = metrics.get(f"{name}@{k}", math.nan)
        summary[name] = value
        print(f"   {name + f'@{k}':<22} {value:.4f}")
    print(f"   {'history_popularity':<22} {metrics['history_popularity']:.1f}")
    for feature in groups:
        print(f"   -- {feature}: value, users, ndcg@{k}, hr@{k}")
        prefix = f"group/{feature}/"
        values = sorted(
            {n[len(prefix) :].split("/")[0] for n in metrics if n.startswith(prefix)}
            - {f"ndcg@{k}_filtered_max_min_ratio", f"hr@{k}_filtered_max_min_ratio"}
        )
        for value in values:
            p = f"{prefix}{value}/"
            print(
                f"      {value:<12} {metrics[p + 'count']:>6.0f} "
                f"{metrics[p + f'ndcg@{k}_filtered']:.4f} {metrics[p + f'hr@{k}_filtered']:.4f}"
            )
        ratio = metrics[f"{prefix}ndcg@{k}_filtered_max_min_ratio"]
        summary[f"{feature}_ndcg_max_min_ratio"] = ratio
        print(
            f"      max/min ndcg@{k}: {ratio:.3f}  hr@{k}: "
            f"{metrics[f'{prefix}hr@{k}_filtered_max_min_ratio']:.3f}"
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default=str(REPO.parent / "shared" / "data" / "ml-1m-features"))
    parser.add_argument("--data", default="runs/data/ml1m-features", help="prepared directory")
    parser.add_argument("--out", default="runs/bias")
    parser.add_argument("--families", nargs="+", default=["sasrec", "two_tower"])
    parser.add_argument("--max-epochs", type=int, default=None, help="override the configs'")
    parser.add_argument("--tiny", action="store_true", help="tiny synthetic configs (smoke run)")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    extra = [] if args.max_epochs is None else ["--trainer.max_epochs", str(args.max_epochs)]
    if args.tiny:
        groups, name = TINY_GROUPS, "tiny"
        data = out / "data-tiny"  # the two-tower tiny config synthesises it (with features)
        # two_tower first: it synthesises the data SASRec then reads.
        families = sorted(args.families, key=lambda f: f != "two_tower")
    else:
        groups, name, families = ML1M_GROUPS, "ml1m", args.families
        data = (REPO / args.data).resolve()
        prepare(Path(args.src).resolve(), data, out)
    summary = {}
    for family in families:
        config = REPO / "configs" / family / f"{name}.yaml"
        summary[family] = show(family, fit(family, config, data, out, groups, extra), groups)
    (out / "bias_report.json").write_text(json.dumps(summary, indent=2))
    print(f"\nsummary: {out / 'bias_report.json'}")


if __name__ == "__main__":
    main()
