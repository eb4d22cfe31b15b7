"""Ragged (jagged) rows on torch tensors: one flat tensor plus per-row starts or a mask.

TorchRec hands lookups back as row-major values without padding, while attention and pooling
want (B, L, D); and both models slice item feature codes out of flat buffers on the model's
device, after :func:`checked_codes` has checked the layout the data layer hands them. The data
layer has the numpy twin of :func:`gather_ragged` (``recforge.data.ragged``); models do not
import the data layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


def gather_ragged(values: Tensor, starts: Tensor, lengths: Tensor) -> Tensor:
    """Concatenation of ``values[starts[i]:starts[i] + lengths[i]]`` over the rows ``i``."""
    exclusive = torch.cumsum(lengths, 0) - lengths
    index = torch.repeat_interleave(starts - exclusive, lengths)
    return values[index + torch.arange(index.numel(), device=index.device)]


def pad_ragged(rows: Tensor, mask: Tensor) -> Tensor:
    """The row-major ``rows`` (T, D) scattered into a zero (B, L, D) tensor where ``mask`` (B, L)
    is true; ``mask`` must have exactly T true entries."""
    padded = rows.new_zeros(*mask.shape, rows.shape[-1])
    return padded.masked_scatter(mask[..., None], rows)


def checked_codes(
    name: str, offsets: Any, codes: Any, num_rows: int, cardinality: int, where: str
) -> tuple[Tensor, Tensor]:
    """``(offsets (num_rows + 1,), codes)`` of one item feature as int64 tensors, after checking
    the layout of ``recforge.data.feature_tables.FeatureTable.sparse_columns``: row ``i``'s
    codes are ``codes[offsets[i]:offsets[i + 1]]``, all in ``[0, cardinality)``. ``where``
    starts the error message (the method that was given them)."""
    offsets = torch.as_tensor(np.asarray(offsets), dtype=torch.int64).reshape(-1)
    codes = torch.as_tensor(np.asarray(codes), dtype=torch.int64).reshape(-1)
    if (
        offsets.shape != (num_rows + 1,)
        or offsets[0] != 0
        or (offsets.diff() < 0).any()
        or offsets[-1] != codes.numel()
    ):
        raise ValueError(
            f"{where}: item feature {name!r}: offsets must be ({num_rows + 1},), "
            f"non-decreasing from 0 to the number of codes"
        )
    if codes.numel() and (codes.min() < 0 or codes.max() >= cardinality):
        raise ValueError(f"{where}: item feature {name!r}: codes must lie in [0, {cardinality})")
    return offsets, codes
