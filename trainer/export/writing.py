"""Writing the pieces of an export artifact (the contract is :mod:`recforge.artifact`).

- :func:`write_onnx`: the user encoder (:mod:`recforge.trainer.export.encoders`) through the
  dynamo exporter, dynamic in batch and sequence length (TorchRec's KeyedJaggedTensor does not
  export, docs/architecture.md §11, so the encoders take padded tensors);
- :func:`users_table` and :func:`user_feature_spec`: what the server needs to encode a known
  user by id, or a new user from raw feature values;
- :func:`write_manifest`: ``manifest.json`` over the files already in the directory. The
  benchmarks build their artifacts with it too, so every artifact has one manifest layout.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from recforge import artifact
from recforge.data import storage
from recforge.trainer.export.errors import ExportError
from recforge.trainer.export.model_card import write_model_card

OPSET = 18


def write_onnx(encoder: nn.Module, example: tuple[Tensor, ...], path: Path) -> None:
    """Export ``encoder`` to ``path``, dynamic in batch and length (up to its max length)."""
    from torch.export import Dim

    batch, length = Dim("batch", min=1, max=65536), Dim("length", min=1, max=encoder.max_length)
    program = torch.onnx.export(
        encoder,
        example,
        dynamo=True,
        external_data=False,
        opset_version=OPSET,
        input_names=list(encoder.names),
        output_names=[artifact.USER_VECTOR],
        dynamic_shapes=encoder.dynamic_shapes(batch, length),
        verbose=False,
    )
    program.save(str(path), external_data=False)


def write_manifest(
    directory: Path,
    encoder: nn.Module,
    item_embeddings: np.ndarray,
    example: tuple[Tensor, ...],
    provenance: dict[str, Any] | None = None,
    checks: dict[str, Any] | None = None,
    feature_kinds: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json`` for the artifact files in ``directory``; returns the manifest.

    ``provenance``: where the artifact comes from (checkpoint, run, data); ``checks``: what was
    measured on it (parity, quantization); ``feature_kinds``: the prepared data's kind of each
    user feature (see :func:`with_feature_kinds`)."""
    num_items, dim = item_embeddings.shape
    manifest: dict[str, Any] = {
        "format": artifact.FORMAT_VERSION,
        "kind": encoder.kind,
        **(provenance or {}),
        "num_items": num_items,
        "dim": dim,
        "max_len": encoder.max_length,
        "opset": OPSET,
        "inputs": with_feature_kinds(encoder.input_specs(), feature_kinds or {}),
        "outputs": [{"name": artifact.USER_VECTOR, "dtype": "float32", "shape": ["batch", dim]}],
        "input_example": {name: x[:1].tolist() for name, x in zip(encoder.names, example)},
        "scoring": "score(item i) = user_vector . item_embeddings[i - 1]"
        + (" (cosine: both sides are unit vectors)" if encoder.unit_vectors else ""),
        **(checks or {}),
        "model_config": _plain(encoder.config),
    }
    write_model_card(directory, manifest)  # before hashing: the card is one of the files
    manifest["files"] = artifact.hash_files(directory)
    artifact.write_manifest(directory, manifest)
    return manifest


def created_now(created_by: str) -> dict[str, str]:
    """The ``created_by``/``created_at`` provenance fields."""
    return {
        "created_by": created_by,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def users_table(dm: Any, encoder: nn.Module) -> Any:
    """Known users: ``user_id``, ``user_idx``, ``history``, and (two-tower) each user input."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from recforge.data.feature_tables import load_feature_tables
    from recforge.data.layout import SEQUENCES, USERS

    users = storage.read_table(
        storage.join(dm.data_dir, USERS), columns=["user_idx", "user_id"]
    ).sort_by("user_idx")
    sequences = storage.read_table(
        storage.join(dm.data_dir, SEQUENCES), columns=["user_idx", "item_idx"]
    )
    sequences = sequences.sort_by("user_idx")
    user_idx = users.column("user_idx").to_numpy().astype(np.int64)
    seq_idx = sequences.column("user_idx").to_numpy().astype(np.int64)
    # A dataset prepared with --vocab-from keeps known users that have no interactions now:
    # they have no sequence row and get an empty history. Any other mismatch is corrupt data.
    row = np.searchsorted(user_idx, seq_idx)
    if len(np.unique(seq_idx)) != len(seq_idx) or not np.array_equal(
        user_idx[np.minimum(row, len(user_idx) - 1)], seq_idx
    ):
        raise ExportError(f"{dm.data_dir}: {SEQUENCES} lists users that {USERS} does not")
    lists = sequences.column("item_idx").combine_chunks().cast(pa.list_(pa.int32()))
    lengths = np.zeros(len(user_idx), np.int32)
    lengths[row] = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    history = pa.ListArray.from_arrays(pa.array(offsets), lists.flatten())
    # The whole history: the encoder reads its last L (or H) items, exclude_seen all of them.
    columns = {
        "user_id": users.column("user_id"),
        "user_idx": users.column("user_idx"),
        "history": history,
    }
    config = encoder.config
    if encoder.reads_user_features:
        table = load_feature_tables(dm.data_dir, dm.manifest).user
        idx = users.column("user_idx").to_numpy().astype(np.int64)
        for name in config.user_feature_cardinalities:
            offsets, codes = table.sparse_columns[name]
            columns[f"user_{name}"] = pa.array(
                [codes[offsets[i] : offsets[i + 1]].tolist() for i in idx], pa.list_(pa.int64())
            )
        if config.user_numeric_features:
            cols = [table.dense_names.index(name) for name in config.user_numeric_features]
            columns["user_dense"] = pa.array(
                table.dense[idx][:, cols].tolist(), pa.list_(pa.float32())
            )
    return pa.table(columns)


def user_feature_spec(dm: Any, encoder: nn.Module) -> dict[str, Any] | None:
    """``user_features.json`` of a model that reads user features: the value of each code
    (1..K; 0 = missing) per categorical/list feature, and the numeric feature names, so a server
    can encode a new user's raw features."""
    from recforge.data.layout import FEATURE_VOCABS

    if not encoder.reads_user_features:
        return None
    config = encoder.config
    vocabs = json.loads(storage.read_bytes(storage.join(dm.data_dir, FEATURE_VOCABS))).get(
        "user", {}
    )
    kinds = user_feature_kinds(dm.manifest)
    spec: dict[str, Any] = {
        "categorical": {},
        "list": {},
        "numeric": list(config.user_numeric_features),
    }
    for name in config.user_feature_cardinalities:
        if kinds.get(name) not in ("categorical", "list") or name not in vocabs:
            raise ExportError(
                f"{dm.data_dir}: user feature {name!r} has no vocabulary in {FEATURE_VOCABS}"
            )
        spec[kinds[name]][name] = vocabs[name]
    return spec


def user_feature_kinds(data_manifest: dict[str, Any]) -> dict[str, str]:
    """Per user feature of the prepared data: ``categorical``, ``list`` or ``numeric``."""
    features = (data_manifest.get("features") or {}).get("user", {})
    return {name: spec.get("kind") for name, spec in features.items()}


def with_feature_kinds(specs: list[dict[str, Any]], kinds: dict[str, str]) -> list[dict[str, Any]]:
    """Mark user feature inputs ``categorical`` (one code per user, 0 = missing: what a user
    without known features must be given, as in training) or ``list`` (missing = no codes)."""
    for spec in specs:
        codes = (
            spec["name"].startswith("user_")
            and spec["dtype"] == "int64"
            and len(spec["shape"]) == 2
        )
        kind = kinds.get(spec["name"][len("user_") :]) if codes else None
        if kind in ("categorical", "list"):
            spec["feature_kind"] = kind
            spec["missing"] = [0] if kind == "categorical" else []
    return specs


def _plain(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config), default=str))
