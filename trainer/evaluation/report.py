"""The evaluation report of a test run: a Markdown table and two PNG plots (docs/architecture.md
§7, §8).

Files, written into one directory: ``report.md`` (every metric, and the per-segment table),
``metrics.json``, ``segments.csv``, ``segments.png`` (filtered HR/NDCG by history length, with
the example count per segment) and ``popularity.png`` (mean training count of the recommended
items at each cut-off against the catalogue mean and maximum, and coverage@K); with a bias
report (:mod:`.bias`), also ``groups.csv`` (HR/NDCG per user-group value) and ``bias.png`` (the
Lorenz curve of recommendation counts, and the shares of training interactions, histories and
recommendations per item-popularity bin). Matplotlib runs headless (Agg); nothing here imports
torch.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_report(
    out: Path,
    metrics: dict[str, float],
    segments: Sequence[dict[str, Any]],
    item_counts: Sequence[float],
    title: str,
    bias: dict[str, Any] | None = None,
) -> list[Path]:
    """Write the report files into ``out``; returns their paths. ``bias``: the bias report's
    plot data (``BiasAccumulator.details()``); its metrics are in ``metrics``."""
    out.mkdir(parents=True, exist_ok=True)
    ks = sorted({int(k.split("@")[1].split("_")[0]) for k in metrics if k.startswith("coverage@")})
    files = [
        out / "metrics.json",
        out / "segments.csv",
        out / "report.md",
        out / "segments.png",
        out / "popularity.png",
    ]
    files[0].write_text(json.dumps({k: _num(v) for k, v in metrics.items()}, indent=2))
    with open(files[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(segments[0]) if segments else ["segment"])
        writer.writeheader()
        writer.writerows(segments)
    groups = group_rows(metrics, (bias or {}).get("group_by", []))
    text = _markdown(metrics, segments, ks, title)
    files[2].write_text(text + (bias_markdown(metrics, bias, groups) if bias else ""))
    _plot_segments(files[3], segments, title)
    _plot_popularity(files[4], metrics, ks, item_counts, title)
    if bias:
        files.append(out / "bias.png")
        _plot_bias(files[-1], metrics, bias, title)
    if groups:
        files.append(out / "groups.csv")
        with open(files[-1], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(groups[0]))
            writer.writeheader()
            writer.writerows(groups)
    return files


def group_rows(metrics: dict[str, float], features: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (user feature, value) from the ``group/<feature>/<value>/...`` metrics."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for name, value in metrics.items():
        parts = name.split("/")
        if len(parts) == 4 and parts[0] == "group" and parts[1] in features:
            row = rows.setdefault((parts[1], parts[2]), {"feature": parts[1], "value": parts[2]})
            row[parts[3]] = value
    return list(rows.values())


def bias_markdown(
    metrics: dict[str, float], bias: dict[str, Any], groups: Sequence[dict[str, Any]]
) -> str:
    """The bias section of ``report.md`` (and of an export's model card)."""
    k = bias["k"]
    names = [f"gini@{k}", f"coverage@{k}", f"novelty@{k}", f"ild@{k}", f"calibration_kl@{k}"]
    names += [f"popularity_lift@{k}", "history_popularity"]
    lines = [
        "",
        f"Popularity bias and filter bubble (top-{k}, filtered; diversity by "
        f"{bias['diversity_basis']}):",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {n} | {metrics[n]:.4f} |" for n in names if n in metrics]
    if groups:
        keys = [key for key in groups[0] if key not in ("feature", "value")]
        lines += ["", "Quality per user group:", "", "| feature | value | " + " | ".join(keys)]
        lines[-1] += " |"
        lines.append("|" + "---|" * (len(keys) + 2))
        for row in groups:
            cells = [f"{row.get(key, float('nan')):.4g}" for key in keys]
            lines.append(f"| {row['feature']} | {row['value']} | " + " | ".join(cells) + " |")
        lines.append("")
        for feature in bias.get("group_by", []):
            for m in ("hr", "ndcg"):
                name = f"group/{feature}/{m}@{k}_filtered_max_min_ratio"
                if name in metrics:
                    lines.append(f"- {feature}: max/min {m}@{k}_filtered = {metrics[name]:.3f}")
    return "\n".join(lines) + "\n"


def _num(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def _markdown(
    metrics: dict[str, float], segments: Sequence[dict[str, Any]], ks: list[int], title: str
) -> str:
    lines = [
        f"# {title}",
        "",
        f"Examples: {metrics.get('count', float('nan')):.0f}",
        "",
        "| metric | unfiltered | filtered |",
        "|---|---|---|",
    ]
    for name in [f"{m}@{k}" for m in ("hr", "ndcg") for k in ks] + ["mrr"]:
        if name in metrics:
            lines.append(
                f"| {name} | {metrics[name]:.4f} | "
                f"{metrics.get(name + '_filtered', float('nan')):.4f} |"
            )
    lines += [
        "",
        "| K | coverage@K | popularity@K | popularity@K (relative) |",
        "|---|---|---|---|",
    ]
    for k in ks:
        lines.append(
            f"| {k} | {metrics[f'coverage@{k}']:.4f} | {metrics[f'popularity@{k}']:.1f} | "
            f"{metrics[f'popularity@{k}_relative']:.4f} |"
        )
    if segments:
        keys = list(segments[0])
        lines += [
            "",
            "History-length segments (filtered):",
            "",
            "| " + " | ".join(keys) + " |",
            "|" + "---|" * len(keys),
        ]
        for row in segments:
            lines.append(
                "| "
                + " | ".join(v if isinstance(v, str) else f"{v:.4g}" for v in row.values())
                + " |"
            )
    return "\n".join(lines) + "\n"


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_segments(path: Path, segments: Sequence[dict[str, Any]], title: str) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [str(row["segment"]) for row in segments]
    metric_keys = [k for k in (segments[0] if segments else {}) if k not in ("segment", "count")]
    width = 0.8 / max(len(metric_keys), 1)
    for i, key in enumerate(metric_keys):
        values = [0.0 if _num(row[key]) is None else row[key] for row in segments]
        ax.bar([x + i * width for x in range(len(labels))], values, width, label=key)
    ax.set_xticks([x + width * (len(metric_keys) - 1) / 2 for x in range(len(labels))])
    ax.set_xticklabels([f"{lab}\n(n={row['count']:.0f})" for lab, row in zip(labels, segments)])
    ax.set_xlabel("history length")
    ax.set_title(f"{title}: quality by history length")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_popularity(
    path: Path, metrics: dict[str, float], ks: list[int], item_counts: Sequence[float], title: str
) -> None:
    plt = _figure()
    counts = [float(c) for c in item_counts[1:]]  # index 0 is padding
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    left.bar(
        [str(k) for k in ks],
        [metrics[f"popularity@{k}"] for k in ks],
        color="tab:orange",
        label="recommended items",
    )
    if counts:
        left.axhline(
            sum(counts) / len(counts), color="tab:blue", linestyle="--", label="catalogue mean"
        )
    left.set_xlabel("K")
    left.set_ylabel("mean training interactions per item")
    left.set_title("popularity of recommended items")
    left.legend()
    right.bar([str(k) for k in ks], [metrics[f"coverage@{k}"] for k in ks], color="tab:green")
    right.set_ylim(0, 1)
    right.set_xlabel("K")
    right.set_title("catalogue coverage@K")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_bias(path: Path, metrics: dict[str, float], bias: dict[str, Any], title: str) -> None:
    plt = _figure()
    k = bias["k"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    xs, ys = zip(*bias["lorenz"]) if bias["lorenz"] else ((0.0, 1.0), (0.0, 1.0))
    left.plot(xs, ys, color="tab:red", label="recommendations")
    left.plot([0, 1], [0, 1], color="grey", linestyle="--", label="equal exposure")
    left.set_xlabel("share of items (least recommended first)")
    left.set_ylabel("share of recommendations")
    left.set_title(f"Lorenz curve, gini@{k} = {metrics.get(f'gini@{k}', float('nan')):.3f}")
    left.legend()
    bins = bias["popularity_bins"]
    width = 0.27
    for i, (name, color) in enumerate(
        (("train", "tab:blue"), ("history", "tab:green"), ("recommended", "tab:orange"))
    ):
        values = bins[name]
        right.bar(
            [x + (i - 1) * width for x in range(len(values))],
            values,
            width,
            color=color,
            label=name,
        )
    right.set_xlabel("item popularity bin (0 = most popular 10% of items)")
    right.set_ylabel("share")
    right.set_title(
        f"popularity lift@{k} = {metrics.get(f'popularity_lift@{k}', float('nan')):.2f}"
    )
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
