"""Warm start (``recforge fit --init_from CHECKPOINT``): a new run whose weights come from a
checkpoint trained on an earlier, possibly smaller, prepared dataset (daily retraining,
docs/architecture.md §6).

Everything but the weights is fresh: trainer state (epoch 0), the dense optimizer, the fused
embedding optimizer state and the sharding plan (any plan and world size the checkpoint was
written with will do). The new dataset must number users and items like the checkpoint's,
which ``recforge data prepare --vocab-from OLD_DATA`` guarantees (:mod:`recforge.data.vocab`):

- every row of an embedding table that the checkpoint has is copied to the same index of the
  new, possibly larger table; rows of new users/items keep their fresh initialisation. A
  feature table (two-tower ``item_<name>``/``user_<name>``, SASRec's attribute bags
  ``item_<name>``) is copied row by row by feature value (``feature_vocabs.json``), since a new
  value can renumber the codes after it;
- dense weights are copied when their shapes match; a dense tensor whose first dimension grew
  by exactly the number of new items or users (a catalogue-sized tensor) is copied on its
  overlapping rows;
- the buffers in :data:`DATA_BUFFERS` are computed from the new data (item frequencies) and
  kept as built;
- any other difference (width, layers, heads, a tensor only one side has) is a
  :class:`~recforge.trainer.checkpoint.CheckpointError` naming the tensor and both shapes.

The dataset check (:func:`check_dataset`) runs before anything is read from the shards: with
``vocab_from`` in the new manifest, its fingerprint must be the vocabulary fingerprint of the
checkpoint's prepared data (``data_dir`` in its hyper-parameters), directly or through a
chain of ``--vocab-from`` preparations; without ``vocab_from``, the new id vocabularies must
start with the checkpoint's (compared id by id: same data, or a re-prepare that happens to
keep the numbering). A dataset with fewer users or items than the checkpoint's is refused.

Sharded tables: every rank reads the checkpoint's *whole* old tables with DCP (whatever plan
wrote them; ``no_dist``, so no collective) into plain CPU tensors and fills its own shards from
them. That costs one full copy of the old tables per rank, acceptable at the sizes recforge
trains today; a table too big for that would need a DCP read of only this rank's row ranges.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from recforge.data import layout, storage
from recforge.trainer.checkpoint import (
    CheckpointError,
    dcp_source,
    read_trainer_state,
    shards_location,
)

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."
"""Prefix of the network's keys in the checkpoint's DCP state (the strategy saves
``{"model": ..., "fused_optimizer": ...}``)."""

DATA_BUFFERS = ("log_item_prob",)
"""State-dict entries (last key component) derived from the training data, not learned: the
new run keeps the values computed from its own data."""


@dataclass
class DatasetMatch:
    """How the new prepared data lines up with the checkpoint's."""

    old_dir: str
    old_manifest: dict[str, Any]
    how: str
    """``vocab_from``, ``vocab_from chain`` or ``same ids``."""
    new_counts: dict[str, int] = field(default_factory=dict)
    """``items`` and ``users`` of the new data."""
    feature_vocabs: dict[str, tuple[list[Any], list[Any]]] = field(default_factory=dict)
    """Table name (``item_<name>``/``user_<name>``) -> (old values, new values) of codes 1..K."""


# --- the dataset ---


def checkpoint_data_dir(path: str | Path, state: dict[str, Any]) -> str:
    """The prepared data the checkpoint was trained on (its DataModule's ``data_dir``)."""
    data_dir = (state.get("datamodule_hyper_parameters") or {}).get("data_dir")
    if not data_dir:
        raise CheckpointError(
            f"warm start from {path}: the checkpoint does not name its prepared data "
            "(no data_dir in its datamodule hyper-parameters)"
        )
    return str(data_dir)


def vocab_fingerprint(directory: str) -> str:
    """The fingerprint ``data prepare --vocab-from DIRECTORY`` records in ``vocab_from``: sha256
    over the sha256 of ``users.parquet`` and ``items.parquet`` (:func:`recforge.data.vocab.
    manifest_entry`)."""
    digest = hashlib.sha256()
    for name in (layout.USERS, layout.ITEMS):
        data = storage.read_bytes(storage.join(directory, name))
        digest.update(f"{name}:{hashlib.sha256(data).hexdigest()}\n".encode())
    return digest.hexdigest()


def _read_manifest(path: str | Path, directory: str, what: str) -> dict[str, Any]:
    try:
        return layout.read_manifest(directory)
    except (FileNotFoundError, ValueError, storage.StorageError) as exc:
        message = getattr(exc, "message", None) or str(exc).splitlines()[0]
        raise CheckpointError(
            f"warm start from {path}: {what} {directory} cannot be read ({message})"
        ) from None


def _ids(directory: str, kind: str) -> list[Any]:
    """The ``kind`` ids of a prepared directory in idx order (as strings: readers may type the
    same ids differently across preparations)."""
    name = layout.USERS if kind == "user" else layout.ITEMS
    table = storage.read_table(
        storage.join(directory, name), columns=[f"{kind}_idx", f"{kind}_id"]
    ).sort_by(f"{kind}_idx")
    return [str(v) for v in table[f"{kind}_id"].to_pylist()]


def _feature_vocabs(directory: str) -> dict[str, Any]:
    try:
        return json.loads(storage.read_bytes(storage.join(directory, layout.FEATURE_VOCABS)))
    except (FileNotFoundError, ValueError):
        return {}


def _follows_vocab_chain(new_manifest: dict[str, Any], old_fingerprint: str) -> str | None:
    """``vocab_from`` or ``vocab_from chain`` when the new data's vocabulary extends the old one,
    directly or through earlier ``--vocab-from`` preparations whose files are unchanged (each
    link's fingerprint is checked); None otherwise."""
    entry = new_manifest.get("vocab_from")
    hops = 0
    while isinstance(entry, dict):
        if entry.get("fingerprint") == old_fingerprint:
            return "vocab_from" if hops == 0 else "vocab_from chain"
        previous = str(entry.get("path", ""))
        try:
            if vocab_fingerprint(previous) != entry.get("fingerprint"):
                return None  # the intermediate directory changed since: the link is unproven
            entry = layout.read_manifest(previous).get("vocab_from")
        except (OSError, ValueError, storage.StorageError):
            return None
        hops += 1
        if hops > 1000:
            return None
    return None


def check_dataset(
    path: str | Path, state: dict[str, Any], data_dir: str, manifest: dict[str, Any]
) -> DatasetMatch:
    """Check that the prepared data ``data_dir`` (manifest ``manifest``) numbers users and items
    like the checkpoint's; raise a one-line :class:`CheckpointError` otherwise."""
    old_dir = checkpoint_data_dir(path, state)
    old = _read_manifest(path, old_dir, "the checkpoint's prepared data")
    for key in ("items", "users"):
        if int(manifest[key]) < int(old[key]):
            raise CheckpointError(
                f"warm start from {path}: data {data_dir} has fewer {key} ({manifest[key]}) "
                f"than the checkpoint's data {old_dir} ({old[key]}); prepare it with "
                f"--vocab-from {old_dir}"
            )
    try:
        old_fingerprint = vocab_fingerprint(old_dir)
    except (OSError, storage.StorageError) as exc:
        raise CheckpointError(
            f"warm start from {path}: cannot read the vocabularies of the checkpoint's data "
            f"{old_dir} ({str(exc).splitlines()[0][:200]})"
        ) from None
    vocab_from = manifest.get("vocab_from")
    if isinstance(vocab_from, dict):
        how = _follows_vocab_chain(manifest, old_fingerprint)
        if how is None:
            raise CheckpointError(
                f"warm start from {path}: data {data_dir} was prepared with --vocab-from "
                f"{vocab_from.get('path')} (vocabulary fingerprint "
                f"{str(vocab_from.get('fingerprint'))[:12]}), not from the checkpoint's data "
                f"{old_dir} ({old_fingerprint[:12]}), so its user/item indices need not line up; "
                f"prepare it with --vocab-from {old_dir}"
            )
    else:
        # Not prepared with --vocab-from: accept it only when its numbering provably agrees
        # (the same ids at the same indices), e.g. the checkpoint's own data or a re-prepare of
        # the same ids; anything else needs --vocab-from.
        how = "same ids"
        for kind in ("user", "item"):
            old_ids, new_ids = _ids(old_dir, kind), _ids(data_dir, kind)
            if new_ids[: len(old_ids)] != old_ids:
                raise CheckpointError(
                    f"warm start from {path}: data {data_dir} was not prepared with --vocab-from "
                    f"and numbers its {kind}s differently from the checkpoint's data {old_dir}; "
                    f"prepare it with --vocab-from {old_dir}"
                )
    old_vocabs, new_vocabs = _feature_vocabs(old_dir), _feature_vocabs(data_dir)
    features = {}
    for side in ("item", "user"):
        for name, values in (new_vocabs.get(side) or {}).items():
            before = (old_vocabs.get(side) or {}).get(name)
            if before is not None:
                features[f"{side}_{name}"] = (list(before), list(values))
    counts = {key: int(manifest[key]) for key in ("items", "users")}
    return DatasetMatch(old_dir, old, how, counts, features)


# --- the weights ---


@dataclass
class _Copy:
    key: str
    source: torch.Tensor | None
    """New row -> old row (-1: keep the fresh row); None: the whole tensor."""
    what: str
    """``table``, ``catalogue``, ``dense`` or ``feature``."""


def _table_name(key: str) -> str | None:
    parts = key.split(".")
    if len(parts) >= 3 and parts[-1] == "weight" and parts[-3] in ("embeddings", "embedding_bags"):
        return parts[-2]
    return None


def _value_map(old: list[Any], new: list[Any], rows: int) -> torch.Tensor:
    """New table row -> old row by feature value (codes 1..K; row 0 = missing maps to 0)."""
    position = {json.dumps(v, sort_keys=True): i + 1 for i, v in enumerate(old)}
    source = torch.full((rows,), -1, dtype=torch.int64)
    source[0] = 0
    for j, value in enumerate(new[: rows - 1]):
        source[j + 1] = position.get(json.dumps(value, sort_keys=True), -1)
    return source


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in value.size())


def plan_copies(
    path: str | Path,
    current: dict[str, Any],
    saved: dict[str, Any],
    growth: dict[str, int],
    match: DatasetMatch,
) -> tuple[list[_Copy], list[str]]:
    """What to copy for each entry of the new network's state dict ``current`` given the
    checkpoint's tensor metadata ``saved`` (network keys -> shape). ``growth``: new minus old
    item and user counts. Returns the copies and the data-derived entries kept as built."""
    mismatched = sorted(set(current) ^ set(saved))
    if mismatched:
        key = mismatched[0]
        side = "the checkpoint" if key in saved else "the new model"
        raise CheckpointError(
            f"warm start from {path}: tensor {key} exists only in {side} "
            f"({len(mismatched)} such tensor(s)); the architecture differs"
        )
    copies, kept = [], []
    for key, value in current.items():
        if not hasattr(value, "size"):
            continue
        new_shape, old_shape = _shape(value), tuple(saved[key])
        table = _table_name(key)
        if key.rsplit(".", 1)[-1] in DATA_BUFFERS:
            kept.append(key.rsplit(".", 1)[-1])
            continue
        if table is not None and table in match.feature_vocabs and len(new_shape) == 2:
            old_values, new_values = match.feature_vocabs[table]
            if (
                old_shape[1:] == new_shape[1:]
                and old_shape[0] == len(old_values) + 1
                and new_shape[0] == len(new_values) + 1
            ):
                source = _value_map(old_values, new_values, new_shape[0])
                copies.append(_Copy(key, source, "feature"))
                continue
        if old_shape == new_shape:
            what = "table" if table is not None else "dense"
            copies.append(_Copy(key, None, what))
            continue
        grew = new_shape[0] - old_shape[0] if new_shape and old_shape else 0
        if (
            len(old_shape) == len(new_shape)
            and old_shape[1:] == new_shape[1:]
            and grew > 0
            and grew in growth.values()
        ):
            source = torch.full((new_shape[0],), -1, dtype=torch.int64)
            source[: old_shape[0]] = torch.arange(old_shape[0])
            copies.append(_Copy(key, source, "table" if table is not None else "catalogue"))
            continue
        raise CheckpointError(
            f"warm start from {path}: tensor {key} has shape {list(old_shape)} in the checkpoint "
            f"but {list(new_shape)} in the new model, which is not a catalogue growth "
            f"(new items {growth['items']}, new users {growth['users']}); the architecture or "
            "config differs (dim, layers, heads, features)"
        )
    return copies, kept


def _saved_shapes(path: str | Path, state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Network key -> shape of every tensor of the checkpoint's model state (DCP metadata)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    source = dcp_source(path, state)
    reader = source.get("storage_reader") or dcp.FileSystemReader(shards_location(path, state))
    try:
        metadata = reader.read_metadata()
    except Exception as exc:
        raise CheckpointError(
            f"warm start from {path}: cannot read the DCP metadata ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})"
        ) from None
    return {
        key[len(MODEL_PREFIX) :]: tuple(int(d) for d in meta.size)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)
    }


def _read_old(
    path: str | Path,
    state: dict[str, Any],
    copies: list[_Copy],
    saved: dict[str, Any],
    dtypes: dict[str, torch.dtype],
) -> dict[str, torch.Tensor]:
    """The checkpoint's whole tensors for ``copies``, read with DCP (resharded from any plan)
    into CPU tensors on this rank alone (no collective)."""
    import torch.distributed.checkpoint as dcp

    skeleton = {
        MODEL_PREFIX + c.key: torch.empty(saved[c.key], dtype=dtypes[c.key]) for c in copies
    }
    try:
        dcp.load(skeleton, **dcp_source(path, state), no_dist=True)
    except BaseException as exc:  # DCP's CheckpointException derives from BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise CheckpointError(
            f"warm start from {path}: the weights do not load ({type(exc).__name__}: {first})"
        ) from None
    return {k[len(MODEL_PREFIX) :]: v for k, v in skeleton.items()}


def _fill(
    target: torch.Tensor, old: torch.Tensor, source: torch.Tensor | None, offsets: list[int]
) -> int:
    """Copy into ``target`` (a shard at ``offsets`` of the whole tensor, or all of it) the old
    rows ``source`` names; returns the rows copied."""
    if source is None:
        index = tuple(slice(o, o + s) for o, s in zip(offsets, target.shape))
        target.copy_(old[index].to(target.device, target.dtype))
        return int(target.shape[0]) if target.dim() else 1
    row0 = offsets[0]
    rows = source[row0 : row0 + target.shape[0]]
    keep = rows >= 0
    if not bool(keep.any()):
        return 0
    cols = tuple(slice(o, o + s) for o, s in zip(offsets[1:], target.shape[1:]))
    local = torch.nonzero(keep).flatten()
    values = old[(rows[keep], *cols)] if cols else old[rows[keep]]
    target[local.to(target.device)] = values.to(target.device, target.dtype)
    return int(local.numel())


def apply_weights(
    net: torch.nn.Module, path: str | Path, state: dict[str, Any], match: DatasetMatch
) -> str:
    """Copy the checkpoint's weights into ``net`` (a DMP-wrapped network; each rank fills its
    own shards). Returns the summary line."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    current = net.state_dict()
    saved = _saved_shapes(path, state)
    # The tensors the new data's catalogue decides: they may grow by the new items or users.
    growth = {k: match.new_counts[k] - int(match.old_manifest[k]) for k in ("items", "users")}
    copies, kept = plan_copies(path, current, saved, growth, match)
    old = _read_old(path, state, copies, saved, {c.key: current[c.key].dtype for c in copies})
    summary: list[str] = []
    dense = 0
    for c in copies:
        value = current[c.key]
        total = _shape(value)[0] if _shape(value) else 1
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                offsets = list(shard.metadata.shard_offsets)
                _fill(shard.tensor, old[c.key], c.source, offsets)
        elif hasattr(value, "to_local"):  # DTensor
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            local = value.to_local()
            _, offsets = compute_local_shape_and_global_offset(
                value.shape, value.device_mesh, value.placements
            )
            _fill(local, old[c.key], c.source, list(offsets))
        else:
            with torch.no_grad():
                _fill(value, old[c.key], c.source, [0] * value.dim())
        # Rows copied over the whole tensor (all ranks), from the plan rather than the shards.
        copied = total if c.source is None else int((c.source >= 0).sum())
        if c.what == "dense":
            dense += 1
        else:
            name = _table_name(c.key) or c.key.rsplit(".", 1)[-1]
            by_value = " (by feature value)" if c.what == "feature" else ""
            summary.append(f"{name} {copied} of {total} rows copied{by_value}")
    net.load_state_dict(current)
    summary.append(f"{dense} dense tensors copied")
    if kept:
        summary.append(f"{', '.join(sorted(set(kept)))} from the new data")
    return ", ".join(summary)


def warm_start(module: Any, path: str | Path) -> str:
    """Fill the sharded network of ``module`` (after ``configure_model`` sharded it) from the
    checkpoint ``path``; every rank calls it. Returns and logs the summary line."""
    path = str(path).rstrip("/") if storage.is_remote(path) else Path(path)
    state = read_trainer_state(path)
    dm = module.trainer.datamodule
    match = check_dataset(path, state, str(dm.data_dir), dm.manifest)
    line = f"warm start from {path}: " + apply_weights(module.net, path, state, match)
    line += f" (data {dm.data_dir} lines up with {match.old_dir}: {match.how})"
    if getattr(module, "global_rank", 0) == 0:
        log.info("%s", line)
    return line
