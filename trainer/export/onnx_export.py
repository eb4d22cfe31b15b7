"""`recforge export`: a checkpoint (or an MLflow run's best checkpoint) -> an ONNX artifact dir.

docs/architecture.md §9. The checkpoint is read into a plain CPU network (:mod:`.loading`),
wrapped in its family's user encoder (:mod:`.encoders`) and exported to ONNX (:mod:`.writing`);
the graph must pass the parity gate (:mod:`.parity`) and, with ``--quantize int8``, the int8 graph
must keep ``--min-recall`` (:mod:`.quantize`). The artifact directory (the contract is
:mod:`recforge.artifact`; written to a temp dir, then renamed):

- ``model.onnx``: the user encoder. SASRec: ``item_ids`` (B, L) int64, right-padded with 0 ->
  ``user_vector`` (B, D) float32. Two-tower: ``item_ids`` (B, H) plus the user inputs the model
  uses (``user_idx``, ``user_<feature>`` codes, ``user_dense``) -> ``user_vector`` (B, out_dim),
  unit rows;
- ``item_embeddings.npy``: (N, D) float32, row i - 1 = item index i (padding row dropped): the
  SASRec item table, or the two-tower item tower's output for every item (its features baked in);
- ``items.parquet``: ``item_idx`` (1..N), original ``item_id``, training ``count``, and each
  categorical/list item feature as a list of its values (:mod:`.item_categories`);
- ``users.parquet``: ``user_id``, ``user_idx`` and ``history`` (item indexes, oldest first),
  plus each user input of a two-tower model, so known users can be served by id; how much of it
  is kept is ``--user-store`` (:mod:`.user_store`: salted-hash keys and the last L or H items by
  default, nothing, or raw ids and whole histories);
- ``user_features.json`` (two-tower models that read user features): each feature's code values
  and the numeric feature names, so a new user's raw features can be encoded when served;
- ``item_index.hnsw.faiss`` (``--ann hnsw``, or ``--ann auto`` above 200,000 items): the faiss
  HNSW index over ``item_embeddings.npy``, so the server loads it instead of building it
  (:mod:`.ann`; its recall@10 against exact search is the manifest's ``ann`` entry);
- ``manifest.json``: format version, kind, dims, opset, inputs/outputs (names, dtypes, shapes),
  sha256 of every other file, run id, metrics, dataset fingerprint, parity figures, ``ann``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recforge import artifact
from recforge.atomic import TargetExistsError, atomic_directory
from recforge.data import storage
from recforge.trainer.checkpoint import CheckpointError
from recforge.trainer.export.ann import ANN_CHOICES, wants_index, write_index
from recforge.trainer.export.encoders import user_encoder
from recforge.trainer.export.errors import ExportError
from recforge.trainer.export.item_categories import item_table
from recforge.trainer.export.loading import load_checkpoint
from recforge.trainer.export.parity import PARITY_SHAPES, parity
from recforge.trainer.export.quantize import RECALL_K, quantize_int8
from recforge.trainer.export.user_store import minimise
from recforge.trainer.export.writing import (
    created_now,
    user_feature_kinds,
    user_feature_spec,
    users_table,
    write_manifest,
    write_onnx,
)


def export(
    checkpoint: str | Path,
    out: str | Path,
    data_dir: str | None = None,
    run_id: str | None = None,
    metrics: dict[str, float] | None = None,
    tolerance: float = 1e-4,
    overwrite: bool = False,
    quantize: str | None = None,
    min_recall: float = 0.9,
    ann: str = "auto",
    ann_m: int = artifact.HNSW_M,
    ann_ef_construction: int = artifact.HNSW_EF_CONSTRUCTION,
    ann_ef_search: int = artifact.HNSW_EF_SEARCH,
    user_store: str = artifact.DEFAULT_USER_STORE,
) -> dict[str, Any]:
    """Export ``checkpoint`` into the artifact directory ``out``; returns the manifest.

    ``quantize="int8"``: ``model.onnx`` is the dynamically int8-quantized graph of the float one
    that passed the parity gate (see :mod:`recforge.trainer.export.quantize`; ``min_recall``
    gates it).

    ``ann``: ``"hnsw"`` builds the HNSW index into the artifact, ``"auto"`` does so above
    :data:`recforge.artifact.ANN_AUTO_MIN_ITEMS` items, ``"none"`` never (see
    :mod:`recforge.trainer.export.ann`)."""
    if user_store not in artifact.USER_STORES:
        raise ExportError(f"user_store={user_store!r}: expected one of {artifact.USER_STORES}")
    if ann not in ANN_CHOICES:
        raise ExportError(f"ann={ann!r}: expected one of {ANN_CHOICES}")
    if quantize not in (None, "int8"):
        raise ExportError(f"quantize={quantize!r}: expected 'int8' or none")
    if not 0.0 <= min_recall <= 1.0:
        raise ExportError(f"min_recall={min_recall}: expected a recall in [0, 1]")
    import pyarrow.parquet as pq

    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")
    loaded = load_checkpoint(checkpoint, data_dir)
    dm = loaded.datamodule
    try:
        # Old artifact aside, new one in, old one deleted: never a moment without a complete one.
        with atomic_directory(out, overwrite=overwrite) as tmp:
            encoder = user_encoder(loaded.family, loaded.network)
            item_embeddings = encoder.item_vectors()  # (N, D): the encoder's array, not a copy
            if not np.isfinite(item_embeddings).all():
                raise ExportError(
                    f"checkpoint {checkpoint}: item vectors hold NaN or inf (a diverged model?)"
                )
            np.save(tmp / artifact.ITEM_EMBEDDINGS, item_embeddings)
            example = encoder.random_inputs(
                2, min(8, encoder.max_length), torch.Generator().manual_seed(1)
            )
            start = time.perf_counter()
            write_onnx(encoder, example, tmp / artifact.MODEL)
            export_seconds = time.perf_counter() - start
            check = parity(encoder, tmp / artifact.MODEL, item_embeddings, tolerance)
            quantization = None
            if quantize == "int8":
                quantization = _quantize(tmp, encoder, item_embeddings, min_recall)
            # With each item feature's values, for exclude_categories (item_categories.py).
            pq.write_table(item_table(dm.data_dir), tmp / artifact.ITEMS)
            users, store = minimise(users_table(dm, encoder), user_store, encoder.max_length)
            if users is not None:
                pq.write_table(users, tmp / artifact.USERS)
            features = user_feature_spec(dm, encoder)
            if features is not None:
                spec = json.dumps(features, indent=1, default=str)
                (tmp / artifact.USER_FEATURES).write_text(spec)
            provenance = {
                **created_now("recforge export"),
                "checkpoint": str(checkpoint)
                if storage.is_remote(checkpoint)
                else str(Path(checkpoint).resolve()),
                "run_id": run_id,
                "user_store": store,
                "metrics": metrics or {},
                "dataset": {
                    "path": dm.data_dir
                    if storage.is_remote(dm.data_dir)
                    else str(Path(dm.data_dir).resolve()),
                    "fingerprint": dm.manifest.get("fingerprint"),
                },
            }
            ann_entry = None
            if wants_index(ann, item_embeddings.shape[0]):
                ann_entry = write_index(
                    tmp,
                    item_embeddings,
                    users,
                    encoder.input_specs(),
                    encoder.max_length,
                    m=ann_m,
                    ef_construction=ann_ef_construction,
                    ef_search=ann_ef_search,
                )
            checks = {
                "parity": check,
                "quantization": quantization,
                "export_seconds": round(export_seconds, 2),
                "ann": ann_entry,
            }
            manifest = write_manifest(
                tmp,
                encoder,
                item_embeddings,
                example,
                provenance=provenance,
                checks=checks,
                feature_kinds=user_feature_kinds(dm.manifest),
            )
    except TargetExistsError:
        raise ExportError(f"{out} exists; pass --overwrite to replace it") from None
    return manifest


def _quantize(
    tmp: Path, encoder: torch.nn.Module, item_embeddings: np.ndarray, min_recall: float
) -> dict[str, Any]:
    """Replace the float graph in ``tmp`` by its int8 graph when that keeps ``min_recall``."""
    result = quantize_int8(
        tmp / artifact.MODEL, tmp / artifact.INT8_MODEL, encoder, item_embeddings, PARITY_SHAPES
    )
    if not np.isfinite(result.max_abs_diff) or result.lowest_recall < min_recall:
        raise ExportError(
            f"int8 quantization lost too much: recall@{RECALL_K} against the float "
            f"model {result.lowest_recall:.3f} < {min_recall} (max |diff| of "
            f"user_vector {result.max_abs_diff:.3g}); export without --quantize, or "
            "lower --min-recall"
        )
    os.replace(tmp / artifact.INT8_MODEL, tmp / artifact.MODEL)
    report = dict(result.report)
    report["min_recall"] = min_recall
    return report


def run_cli(args: Any) -> int:
    import sys

    from recforge.trainer.tracking.logger import TrackingConfig, TrackingError, resolve_tracking

    try:
        needs_mlflow = bool(args.run_id or args.register or args.log_to_run)
        uri = None
        if needs_mlflow:
            uri = resolve_tracking(TrackingConfig(tracking_uri=args.tracking_uri))[0]
        checkpoint, run_id = args.checkpoint, args.run_id or args.log_to_run
        if args.run_id:
            from mlflow import MlflowClient

            tags = MlflowClient(uri).get_run(args.run_id).data.tags
            checkpoint = tags.get(artifact.BEST_CHECKPOINT_TAG) or tags.get(
                artifact.LAST_CHECKPOINT_TAG
            )
            if not checkpoint:
                raise ExportError(
                    f"MLflow run {args.run_id} records no checkpoint "
                    f"(tag {artifact.BEST_CHECKPOINT_TAG})"
                )
        metrics = None
        if run_id:
            from mlflow import MlflowClient

            run_metrics = MlflowClient(uri).get_run(run_id).data.metrics
            metrics = {k: v for k, v in run_metrics.items() if k.startswith("test/")}
        manifest = export(
            checkpoint,
            args.out,
            data_dir=args.data_dir,
            run_id=run_id,
            metrics=metrics,
            tolerance=args.tolerance,
            overwrite=args.overwrite,
            quantize=args.quantize,
            min_recall=args.min_recall,
            ann=getattr(args, "ann", "auto"),
            user_store=getattr(args, "user_store", artifact.DEFAULT_USER_STORE),
        )
        print(
            f"exported {checkpoint} -> {args.out} "
            f"(parity: max |diff| {manifest['parity']['max_abs_diff']:.2e})"
        )
        q = manifest["quantization"]
        if q:
            print(
                f"int8: recall@10 vs float {q['recall@10_vs_float']:.3f}, max |diff| vs PyTorch "
                f"{q['max_abs_diff_vs_pytorch']:.2e}, {q['bytes_float']} -> {q['bytes_int8']} "
                "bytes"
            )
        a = manifest.get("ann")
        if a:
            print(
                f"HNSW index (M {a['m']}, efConstruction {a['ef_construction']}): built in "
                f"{a['build_seconds']:.1f} s, recall@10 vs exact {a['recall@10_vs_exact']:.3f} at "
                f"efSearch {a['ef_search']} ({a['queries']} {a['query_source']} queries)"
            )
        if args.triton:
            from recforge.trainer.export.triton import write_triton_repository

            model_dir = write_triton_repository(args.out, args.triton, args.triton_name)
            print(f"Triton model repository: {model_dir}")
        if needs_mlflow:
            if not run_id:
                raise ExportError(
                    "--register needs an MLflow run to log into: pass --run-id or --log-to-run"
                )
            from recforge.trainer.tracking.registry import log_and_register

            result = log_and_register(args.out, uri, run_id, args.register, args.alias)
            print(json.dumps(result))
    except (ExportError, CheckpointError, TrackingError) as exc:
        print(f"recforge export: error: {exc}", file=sys.stderr)
        return 2
    return 0
