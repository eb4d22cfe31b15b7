"""Ragged (jagged) rows on torch tensors: one flat tensor plus per-row starts or a mask.

TorchRec hands lookups back as row-major values without padding, while attention and pooling
want (B, L, D); and the two-tower model slices item feature codes out of flat buffers on the
model's device. The data layer has the numpy twin of :func:`gather_ragged`
(``recforge.data.ragged``); models do not import the data layer.
"""

from __future__ import annotations

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
