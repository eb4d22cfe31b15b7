"""``MODEL_CARD.md`` of an export artifact (docs/architecture.md §9): what the model is, the data
it was trained on and that data's fingerprint, the training configuration, its test metrics
overall, per history-length bucket and per user group, its popularity bias and known limits.

Everything comes from what already exists when the manifest is written: the manifest's own
provenance (checkpoint, run id, dataset path and fingerprint, model config, metrics), the
prepared directory's ``manifest.json``, and the files ``recforge fit`` left in the checkpoint's
run folder (``<run>/checkpoints/<ckpt>`` -> ``<run>/test_metrics.json``, the evaluation report
of §7, and ``<run>/config.yaml``, the resolved configuration). What is missing is said so in the
card, never invented. The file is hashed into the manifest and logged to MLflow with the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from recforge import artifact
from recforge.data import storage
from recforge.trainer.evaluation.report import bias_markdown, group_rows

EVALUATION_FILE = "test_metrics.json"
CONFIG_FILE = "config.yaml"


def write_model_card(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write ``directory/MODEL_CARD.md`` for the (not yet hashed) ``manifest``; returns its path."""
    run_dir = run_folder(manifest.get("checkpoint"))
    evaluation = _read_json(run_dir / EVALUATION_FILE) if run_dir else None
    config = _read_text(run_dir / CONFIG_FILE) if run_dir else None
    dataset = manifest.get("dataset") or {}
    data = None
    if dataset.get("path"):
        data = _read_json_any(storage.join(dataset["path"], "manifest.json"))
    lines = [f"# Model card: {manifest.get('kind')} recommender", ""]
    lines += _model(manifest)
    lines += _data(dataset, data)
    lines += _config(config, run_dir, manifest)
    lines += _evaluation(evaluation, run_dir, manifest)
    lines += _limits(evaluation, data, manifest)
    path = directory / artifact.MODEL_CARD
    path.write_text("\n".join(lines) + "\n")
    return path


def run_folder(checkpoint: Any) -> Path | None:
    """The run folder of a local checkpoint (``<run>/checkpoints/<ckpt>``), else None."""
    if not checkpoint or storage.is_remote(str(checkpoint)):
        return None
    run = Path(str(checkpoint)).parent.parent
    return run if run.is_dir() else None


def _model(manifest: dict[str, Any]) -> list[str]:
    config = manifest.get("model_config") or {}
    shown = {k: v for k, v in config.items() if not isinstance(v, (dict, list)) or len(str(v)) < 80}
    return [
        "## Model",
        "",
        f"- kind: `{manifest.get('kind')}`; {manifest.get('num_items')} items, vectors of "
        f"{manifest.get('dim')} dimensions; scoring: {manifest.get('scoring')}",
        f"- created {manifest.get('created_at')} by {manifest.get('created_by')}",
        f"- checkpoint: `{manifest.get('checkpoint')}`; MLflow run: `{manifest.get('run_id')}`",
        f"- model configuration: `{json.dumps(shown, default=str)}`",
        "",
    ]


def _data(dataset: dict[str, Any], data: dict[str, Any] | None) -> list[str]:
    lines = [
        "## Data",
        "",
        f"- prepared directory: `{dataset.get('path')}`",
        f"- fingerprint (sha256 over the data files): `{dataset.get('fingerprint')}`",
    ]
    if data is None:
        return lines + ["- its `manifest.json` could not be read, so no more is known here", ""]
    source = data.get("source") or {}
    for src in source.get("files") or []:
        lines.append(
            f"- source ({source.get('format')}) `{src.get('path')}`: {src.get('rows')} rows, "
            f"sha256 `{src.get('sha256')}`"
        )
    lines.append(
        f"- {data.get('users')} users, {data.get('items')} items, "
        f"{data.get('interactions')} interactions; split: `{json.dumps(data.get('split'))}`"
    )
    removed = data.get("rows_removed")
    if removed:
        lines.append(f"- input rows removed, by reason: `{json.dumps(removed, default=str)}`")
    for key in sorted(k for k in data if "consent" in k or "opt_out" in k or "erasure" in k):
        lines.append(f"- {key}: `{json.dumps(data[key], default=str)}`")
    features = data.get("features") or {}
    for side in ("item", "user"):
        specs = features.get(side) or {}
        named = ", ".join(f"{n} ({s.get('kind')})" for n, s in specs.items()) or "none"
        lines.append(f"- {side} features: {named}")
    return lines + [""]


def _config(config: str | None, run_dir: Path | None, manifest: dict[str, Any]) -> list[str]:
    lines = ["## Training configuration", ""]
    if config is None:
        where = f"`{run_dir / CONFIG_FILE}`" if run_dir else "the checkpoint's run folder"
        return lines + [f"Not found ({where} is missing); the model part is above.", ""]
    return lines + [f"From `{run_dir / CONFIG_FILE}`:", "", "```yaml", config.rstrip(), "```", ""]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4f}"
    return "n/a" if value is None else str(value)


def _evaluation(
    evaluation: dict[str, Any] | None, run_dir: Path | None, manifest: dict[str, Any]
) -> list[str]:
    lines = ["## Evaluation", ""]
    if evaluation is None:
        where = f"`{run_dir / EVALUATION_FILE}`" if run_dir else "no local run folder"
        lines += [
            f"No evaluation report was found ({where}): per-group, per-history-length and "
            "popularity-bias figures are unknown for this model. Test metrics recorded with "
            "the export:",
            "",
        ]
        recorded = manifest.get("metrics") or {}
        lines += [f"- {k}: {_fmt(v)}" for k, v in sorted(recorded.items())] or ["- none"]
        return lines + [""]
    metrics = {k: (math.nan if v is None else v) for k, v in evaluation["metrics"].items()}
    users = evaluation.get("users_evaluated")
    lines += [
        f"Test stage, full ranking over all items (docs/architecture.md §7), from "
        f"`{run_dir / EVALUATION_FILE}`: {users if users is not None else metrics.get('count')} "
        f"users{' (a uniform sample)' if evaluation.get('sampled') else ''}.",
        "",
        "### Overall",
        "",
        "| metric | unfiltered | filtered |",
        "|---|---|---|",
    ]
    ks = sorted({int(k.split("@")[1].split("_")[0]) for k in metrics if k.startswith("hr@")})
    for name in [f"{m}@{k}" for m in ("hr", "ndcg") for k in ks] + ["mrr"]:
        if name in metrics:
            filtered = metrics.get(f"{name}_filtered", math.nan)
            lines.append(f"| {name} | {_fmt(metrics[name])} | {_fmt(filtered)} |")
    segments = evaluation.get("segments") or []
    if segments:
        keys = list(segments[0])
        lines += ["", "### By history length", "", "| " + " | ".join(keys) + " |"]
        lines.append("|" + "---|" * len(keys))
        lines += ["| " + " | ".join(_fmt(row[k]) for k in keys) + " |" for row in segments]
    bias = evaluation.get("bias")
    lines += ["", "### Per user group and popularity bias"]
    if bias:
        groups = group_rows(metrics, bias.get("group_by", []))
        lines += bias_markdown(metrics, bias, groups).splitlines()
        if not bias.get("group_by"):
            lines += ["", "No user groups were evaluated (`model.evaluation.group_by` unset)."]
    else:
        lines += ["", "Not in this report (it predates the bias report)."]
    return lines + [""]


def _limits(
    evaluation: dict[str, Any] | None, data: dict[str, Any] | None, manifest: dict[str, Any]
) -> list[str]:
    lines = [
        "## Known limits",
        "",
        "- Learned from past interactions only: it repeats their popularity and exposure biases "
        "and cannot recommend items added after the data was prepared.",
        "- Offline figures: one held-out item per user, ranked against the whole catalogue; "
        "they do not measure online outcomes or long-term effects of the recommendations.",
        "- A user without a usable history gets the most popular items (fallback), not a "
        "personalised list.",
        "- Erasing a user from the data does not remove what the trained weights learned from "
        "them: retrain on the erased data for that.",
    ]
    metrics = (evaluation or {}).get("metrics") or {}
    bias = (evaluation or {}).get("bias") or {}
    k = bias.get("k")
    lift = metrics.get(f"popularity_lift@{k}") if k else None
    if isinstance(lift, (int, float)) and lift > 1:
        lines.append(
            f"- Popularity bias: recommended items are {lift:.2f}x as popular (training "
            "interactions) as the items in users' histories."
        )
    for feature in bias.get("group_by", []):
        ratio = metrics.get(f"group/{feature}/ndcg@{k}_filtered_max_min_ratio")
        if isinstance(ratio, (int, float)) and ratio > 1.2:
            lines.append(
                f"- Quality differs between `{feature}` groups: NDCG@{k} max/min {ratio:.2f}."
            )
    if evaluation is not None and evaluation.get("sampled"):
        lines.append("- Test metrics come from a sample of users (`data.eval_max_users`).")
    if data is not None and not (data.get("features") or {}).get("user"):
        lines.append("- The data has no user features: quality per user group is not measured.")
    return lines


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    text = _read_text(path)
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def _read_json_any(location: str) -> dict[str, Any] | None:
    """A JSON file, local or on object storage; None when it cannot be read."""
    try:
        return json.loads(storage.read_bytes(location))
    except Exception:  # the card says the data manifest was unreadable; export goes on
        return None
