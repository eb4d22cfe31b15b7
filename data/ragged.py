"""Ragged (jagged) arrays as one flat array plus per-row starts and lengths, in numpy (and
read so from Arrow list columns).

The loader's batches, its feature tables and the baselines all slice many rows out of one flat
array at once; a Python loop over rows would dominate their cost. The models do the same on
torch tensors inside the network (``recforge.models.ragged``), which cannot import this layer.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def gather_ragged(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``flat[starts[i]:starts[i] + lengths[i]]`` over the rows ``i``."""
    total = int(lengths.sum())
    if total == 0:
        return flat[:0]
    exclusive = np.cumsum(lengths) - lengths
    return flat[np.repeat(starts - exclusive, lengths) + np.arange(total)]


def list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(flat values, per-row lengths)`` of a list column."""
    col = table.column(name).combine_chunks()
    return (
        col.flatten().to_numpy(zero_copy_only=False),
        pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64),
    )
