"""Erasure: `recforge data forget`, the erasure ledger, and the check that `recforge fit` runs
(docs/architecture.md §3, "Personal data").

**Where the ledger lives.** One ledger per raw input, ``erasures.jsonl`` beside it (in the first
``--input`` when that is a directory, else in its folder; ``data prepare --erasure-ledger`` names
another place). Every prepared directory records the ledger's location in its manifest
(``erasure_ledger.path``) and the entries already applied to it (``erasure_ledger.applied``). All
datasets prepared from one input, their copies and backups, therefore point at the same ledger:

- ``data forget --users FILE P`` appends an entry (first, so a crash part-way leaves P refused by
  ``fit`` rather than an erasure unrecorded), then rewrites P without those users and marks the
  entry applied;
- ``data prepare`` hashes every input user with each entry's salt and drops the matches, so a
  re-prepare from the same input cannot bring a forgotten user back;
- ``fit`` refuses a dataset that lacks an entry of its ledger (an older copy of P, or one prepared
  before the erasure): :func:`check_current`. ``data forget P`` without ``--users`` applies the
  missing entries to it, from the hashes alone.

**An entry** (one JSON line): ``id``, ``at`` (UTC), ``users_listed``, ``salt`` (random, per
entry) and ``hashes``: ``recforge.artifact.user_key(salt, id)``, sorted; never a raw id. The
hashes stop casual reading and linking across ledgers, not someone who holds the ledger and
can enumerate the id space (a salted hash of a small integer id is found by trying them all):
keep the ledger under the raw data's access controls.

``forget`` rewrites the whole dataset in memory (users, sequences and items; no k-core rerun):
users are renumbered 1..U in their order, item indexes and features stay, item counts, split
counts, length statistics and the fingerprint are recomputed, and ``rows_removed["erased"]``
keeps removed rows plus interactions equal to the input rows. Locally the new directory is
built under a hidden name and renamed over P (:mod:`recforge.atomic`); on ``s3://`` it is built
locally and uploaded with ``manifest.json`` last, after the old manifest is deleted.
"""

from __future__ import annotations

import json
import posixpath
import secrets
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recforge.artifact import user_key
from recforge.atomic import atomic_directory
from recforge.data import layout, stats, storage
from recforge.data.consent import canonical_id, read_user_list
from recforge.data.errors import DataError

LEDGER = "erasures.jsonl"


class StaleDatasetError(DataError):
    """A prepared dataset misses an entry of its erasure ledger (``fit`` refuses it)."""

    every_rank = True
    """Every rank reads the same ledger and raises alike: the CLI prints it on rank 0 only."""


@dataclass
class Ledger:
    path: str
    entries: list[dict[str, Any]]

    def matches(self, canonical: list[str], entries: list[dict[str, Any]] | None = None) -> Any:
        """Boolean mask over ``canonical`` ids: erased by any of ``entries`` (default all)."""
        hit = np.zeros(len(canonical), bool)
        for entry in self.entries if entries is None else entries:
            hashes = set(entry["hashes"])
            hit |= np.array([user_key(entry["salt"], c) in hashes for c in canonical], bool)
        return hit

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.entries]


def default_ledger_path(inputs: list[str]) -> str:
    """``erasures.jsonl`` in the first input when it is a directory, else beside it."""
    first = inputs[0]
    if storage.is_remote(first):
        base = first if first.endswith("/") or not posixpath.splitext(first)[1] else None
        return storage.join(base or posixpath.dirname(first), LEDGER)
    path = Path(first)
    if any(ch in first for ch in "*?["):
        path = Path(first.split("*")[0].split("?")[0].split("[")[0] or ".")
        path = path if path.is_dir() else path.parent
    elif not path.is_dir():
        path = path.parent
    return str((path / LEDGER).absolute())


def read_ledger(path: str) -> Ledger:
    """The ledger at ``path``; an empty one when there is no file."""
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        return Ledger(path, [])
    entries = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not all(k in entry for k in ("id", "salt", "hashes")):
                raise ValueError("lacks id, salt or hashes")
        except ValueError as exc:
            raise DataError(
                f"not an erasure ledger entry ({exc})", path=path, row=line_no
            ) from None
        entries.append(entry)
    return Ledger(path, entries)


def append_entry(path: str, canonical_ids: frozenset[str]) -> dict[str, Any]:
    """Append an entry for ``canonical_ids`` to the ledger at ``path``; returns it."""
    salt = secrets.token_hex(16)
    entry = {
        "id": uuid.uuid4().hex,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "users_listed": len(canonical_ids),
        "salt": salt,
        "hashes": sorted(user_key(salt, c) for c in canonical_ids),
    }
    line = (json.dumps(entry) + "\n").encode()
    if storage.is_remote(path):
        # Object stores cannot append: read, add, write back (one PUT).
        try:
            old = storage.read_bytes(path)
        except FileNotFoundError:
            old = b""
        storage.write_bytes(path, old + line)
    else:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as f:
                f.write(line)
                f.flush()
        except OSError as exc:
            raise DataError(f"cannot append to the erasure ledger ({exc})", path=path) from None
    return entry


def ledger_of(manifest: dict[str, Any]) -> str | None:
    """The ledger a prepared dataset's manifest points at (datasets prepared before ledgers
    existed: the default beside their first source file)."""
    recorded = (manifest.get("erasure_ledger") or {}).get("path")
    if recorded:
        return recorded
    files = (manifest.get("source") or {}).get("files") or []
    return default_ledger_path([files[0]["path"]]) if files else None


def check_current(data_dir: str, manifest: dict[str, Any]) -> None:
    """Refuse a dataset that lacks an entry of its erasure ledger (one line, for ``fit``)."""
    path = ledger_of(manifest)
    if path is None:
        return
    ledger = read_ledger(path)
    applied = set((manifest.get("erasure_ledger") or {}).get("applied", []))
    missing = [e for e in ledger.entries if e["id"] not in applied]
    if missing:
        first = missing[0]
        raise StaleDatasetError(
            f"prepared before {len(missing)} erasure(s) recorded in {path} (the first of "
            f"{first.get('at')}, {first.get('users_listed')} user(s)); apply them with "
            f"`recforge data forget {data_dir}` or prepare the data again",
            path=data_dir,
        )


def forget(
    prepared_dir: str, users_file: str | None = None, ledger_path: str | None = None
) -> dict[str, Any]:
    """Remove the users listed in ``users_file`` (and those of any ledger entry not yet applied)
    from ``prepared_dir``; returns a summary without ids."""
    manifest = layout.read_manifest(prepared_dir)
    path = ledger_path or ledger_of(manifest)
    if path is None:
        raise DataError("no erasure ledger location; pass --ledger", path=prepared_dir)
    listed = read_user_list(users_file) if users_file else None
    ledger = read_ledger(path)
    applied = list((manifest.get("erasure_ledger") or {}).get("applied", []))
    pending = [e for e in ledger.entries if e["id"] not in applied]
    if listed is None and not pending:
        raise DataError(
            f"nothing to forget: no --users and no entry of {path} is missing here",
            path=prepared_dir,
        )
    if listed is not None:
        # First the record, then the data: a crash between leaves the dataset refused by fit.
        pending.append(append_entry(path, listed.ids))
    users = storage.read_table(storage.join(prepared_dir, layout.USERS)).sort_by("user_idx")
    canonical = [canonical_id(v) for v in users["user_id"].to_pylist()]
    gone = Ledger(path, pending).matches(canonical)
    applied += [e["id"] for e in pending]
    summary = _rewrite(prepared_dir, manifest, users, gone, path, applied)
    summary.update(ledger=path, entries_applied=len(pending))
    return summary


def _rewrite(
    prepared_dir: str,
    manifest: dict[str, Any],
    users: pa.Table,
    gone: np.ndarray,
    ledger_path: str,
    applied: list[str],
) -> dict[str, Any]:
    from recforge.data.prepared_output import data_fingerprint
    from recforge.data.split_rules import split_counts

    sequences = storage.read_table(storage.join(prepared_dir, layout.SEQUENCES)).sort_by("user_idx")
    items = storage.read_table(storage.join(prepared_dir, layout.ITEMS)).sort_by("item_idx")
    old_idx = users["user_idx"].to_numpy().astype(np.int64)
    new_of_old = np.zeros(int(old_idx.max(initial=0)) + 1, np.int64)
    kept_idx = old_idx[~gone]
    new_of_old[kept_idx] = np.arange(1, len(kept_idx) + 1)
    seq_users = sequences["user_idx"].to_numpy().astype(np.int64)
    keep_rows = new_of_old[seq_users] > 0
    removed_rows = int(sequences["length"].to_numpy()[~keep_rows].sum())
    sequences = sequences.filter(pa.array(keep_rows))
    sequences = sequences.set_column(
        0, "user_idx", pa.array(new_of_old[seq_users[keep_rows]].astype(np.int32))
    )
    if sequences.num_rows == 0:
        raise DataError("forgetting these users leaves no interactions", path=prepared_dir)
    users = users.filter(pa.array(~gone))
    users = users.set_column(
        users.schema.get_field_index("user_idx"),
        "user_idx",
        pa.array(np.arange(1, users.num_rows + 1, dtype=np.int32)),
    )
    flat_items = pc.list_flatten(sequences["item_idx"]).to_numpy().astype(np.int64)
    counts = np.bincount(flat_items, minlength=items.num_rows + 1)[1:]
    items = items.set_column(
        items.schema.get_field_index("count"), "count", pa.array(counts.astype(np.int64))
    )
    lengths = sequences["length"].to_numpy().astype(np.int64)
    flat_ts = pc.list_flatten(sequences["timestamp"]).to_numpy()
    train_end, val_end = layout.split_bounds(manifest["split"], lengths, flat_ts)

    m = dict(manifest)
    m["rows_removed"] = {**m["rows_removed"], "erased": m["rows_removed"].get("erased", 0)}
    m["rows_removed"]["erased"] += removed_rows
    m["interactions"] = int(lengths.sum())
    m["users"] = users.num_rows
    m["split_counts"] = split_counts(lengths, train_end, val_end)
    m["sequence_length"] = {
        "min": int(lengths.min()),
        "median": float(np.median(lengths)),
        "mean": float(lengths.mean()),
        "max": int(lengths.max()),
    }
    m.update(stats.manifest_entries(train_end, counts))
    # Users are renumbered: the indexes no longer extend a --vocab-from directory's.
    m.pop("vocab_from", None)
    m["erasure_ledger"] = {"path": ledger_path, "applied": applied}
    m["erased_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    summary = {"users_removed": int(gone.sum()), "rows_removed": removed_rows}

    def write(tmp: Path) -> None:
        row_group = int(manifest.get("sequences_row_group_size") or 4096)
        pq.write_table(sequences, tmp / layout.SEQUENCES, row_group_size=row_group)
        pq.write_table(users, tmp / layout.USERS)
        pq.write_table(items, tmp / layout.ITEMS)
        vocabs = storage.read_bytes(storage.join(prepared_dir, layout.FEATURE_VOCABS))
        (tmp / layout.FEATURE_VOCABS).write_bytes(vocabs)
        m["fingerprint"] = data_fingerprint(tmp)
        (tmp / layout.MANIFEST).write_text(json.dumps(m, indent=2) + "\n")

    if not storage.is_remote(prepared_dir):
        with atomic_directory(prepared_dir, overwrite=True) as tmp:
            write(tmp)
        return summary
    local = Path(tempfile.mkdtemp(prefix=".recforge-forget-"))
    try:
        write(local)
        # Readers take a prefix without a manifest for no dataset: old manifest out first.
        storage.delete_file(storage.join(prepared_dir, layout.MANIFEST))
        storage.delete_directory(prepared_dir)
        storage.upload_directory(local, prepared_dir, last=layout.MANIFEST)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return summary
