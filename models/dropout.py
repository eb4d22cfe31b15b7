"""Dropout whose CPU mask costs a third of ``nn.Dropout``'s.

On CPU, ``F.dropout`` draws one Bernoulli float per element (``bernoulli_``) and divides the
mask by ``1 - p`` in a second pass: in SASRec on ML-1M that was a sixth of a training step. Here
the mask comes from 8 random bits per element (numpy's SFC64, seeded from torch's global
generator, so ``torch.manual_seed`` still fixes it), compared with a threshold, as
FlashAttention does on GPUs. ``p`` is therefore rounded to a multiple of 1/256 (0.2 becomes
0.1992, 0.1 becomes 0.1016: never off by more than 0.002); kept values are scaled by the inverse
of the keep probability actually used, so the expectation is exact. A ``p`` below 1/512, which
would round to 0, keeps ``F.dropout``.

Anywhere else than CPU, and in eval mode, this is ``F.dropout``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LEVELS = 1 << 8


def dropout_mask(
    shape: torch.Size | tuple[int, ...],
    p: float,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> Tensor:
    """A mask of ``shape``: 0 with probability ~p, else ``1 / (1 - p)`` (see the module
    docstring)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p={p!r}: must be in [0, 1)")
    dropped = _dropped_levels(p)
    numel = 1
    for size in shape:
        numel *= size
    bits = _random_bytes(numel).to(device).view(shape)  # uniform on [-128, 128)
    keep = bits >= dropped - _LEVELS // 2
    # Through uint8: bool -> float is an unvectorised cast on CPU, uint8 -> float is 7x faster.
    return keep.view(torch.uint8).to(dtype).mul_(_LEVELS / (_LEVELS - dropped))


def _random_bytes(n: int) -> Tensor:
    """``n`` uniform int8 values from numpy's SFC64 (twice as fast as torch's CPU Mersenne
    Twister here, and not serial in it), seeded by one draw of torch's global generator so that
    ``torch.manual_seed`` fixes them."""
    seed = int(torch.empty((), dtype=torch.int64).random_())
    words = np.random.SFC64(seed).random_raw((n + 7) // 8)
    return torch.from_numpy(words.view(np.int8)[:n])


def effective_p(p: float) -> float:
    """The drop probability :func:`dropout_mask` really uses for ``p``."""
    return _dropped_levels(p) / _LEVELS


def _dropped_levels(p: float) -> int:
    return min(round(p * _LEVELS), _LEVELS - 1)


class _MaskedScale(torch.autograd.Function):
    """``x * mask`` that saves only the mask (not ``x``) for the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout(x, p, training)``, with the cheaper mask on CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or effective_p(p) == 0.0:
        return F.dropout(x, p, True)
    return _MaskedScale.apply(x, dropout_mask(x.shape, p, x.dtype, x.device))


class Dropout(nn.Module):
    """``nn.Dropout`` with the cheaper CPU mask of :func:`dropout`."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout p={p!r}: must be in [0, 1)")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
