"""The artifact's user store: how much of each known user an export keeps
(``--user-store none|hashed|full``; the contract is :data:`recforge.artifact.USER_STORES`).

An artifact is copied into MLflow's artifact store and the model registry, to serving hosts and
into images, so by default it keeps the least a server needs to answer a known user by id:

- ``hashed`` (default): ``user_id`` is :func:`recforge.artifact.user_key` under a fresh random
  salt written to the manifest (the server hashes an incoming id the same way), and ``history``
  keeps only the last ``max_len`` items, what the encoder reads (SASRec's ``max_len``, the
  two-tower ``history_len``). The model inputs (``user_idx``, user features) stay: the encoder
  takes them. ``exclude_seen`` then covers the kept items only.
- ``none``: no ``users.parquet``; requests send the history (and user features).
- ``full``: raw ids and whole histories, as artifacts before format 1.1.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np
import pyarrow as pa

from recforge import artifact
from recforge.trainer.export.errors import ExportError


def minimise(users: pa.Table, mode: str, max_len: int) -> tuple[pa.Table | None, dict[str, Any]]:
    """``users.parquet`` as the store ``mode`` keeps it (None: no file), and the manifest's
    ``user_store`` entry."""
    if mode not in artifact.USER_STORES:
        raise ExportError(f"user_store={mode!r}: expected one of {artifact.USER_STORES}")
    if mode == "full":
        return users, {"mode": "full"}
    if mode == "none":
        return None, {"mode": "none"}
    salt = secrets.token_hex(16)
    keys = pa.array([artifact.user_key(salt, u) for u in users.column("user_id").to_pylist()])
    history = _last(users.column("history").combine_chunks(), max_len)
    index = users.schema.get_field_index
    users = users.set_column(index("user_id"), "user_id", keys)
    users = users.set_column(index("history"), "history", history)
    entry = {
        "mode": "hashed",
        "salt": salt,
        "key": "user_id column = sha256(salt + NUL + canonical user id), hex",
        "history_cap": max_len,
    }
    return users, entry


def _last(lists: pa.ListArray, cap: int) -> pa.ListArray:
    """Each list's last ``cap`` values, vectorised over the offsets."""
    offsets = lists.offsets.to_numpy().astype(np.int64)
    starts = np.maximum(offsets[:-1], offsets[1:] - cap)
    lengths = offsets[1:] - starts
    take = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    take = take + np.arange(int(lengths.sum()))
    values = lists.flatten().take(pa.array(take - offsets[0]))
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(new_offsets), values)
