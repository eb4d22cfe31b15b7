"""SASRec's transformer block: causal self-attention over right-padded rows, the packed
training path (position-wise layers on real positions only), and the pre-LN or LiGR-gated block.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recforge.models.dropout import Dropout, dropout

BlockKind = Literal["pre_ln", "ligr"]
BLOCKS: tuple[BlockKind, ...] = ("pre_ln", "ligr")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask, via ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, packing: Packing | None = None) -> Tensor:
        """(B, L, D) -> (B, L, D); or, with ``packing``, the (T, D) real positions -> (T, D)."""
        dim = x.shape[-1]
        qkv = self.qkv(x)  # (B, L, 3D) or (T, 3D)
        if packing is not None:
            qkv = packing.unpack(qkv)  # (B, L, 3D), zero at padding
        b, length, _ = qkv.shape
        qkv = qkv.view(b, length, 3, self.num_heads, dim // self.num_heads)  # (B, L, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, Dh)
        if self.training and self.dropout > 0 and x.device.type == "cpu":
            y = _causal_attention_with_dropout(q, k, v, self.dropout)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )  # (B, H, L, Dh)
        y = y.transpose(1, 2).reshape(b, length, dim)  # (B, L, D)
        return self.out(y if packing is None else packing.pack(y))  # (B, L, D) or (T, D)


class Packing:
    """The real (non-padding) positions of a right-padded (B, L) batch, in row-major order.

    Training runs every position-wise layer (norms, projections, FFN, dropout) on the (T, D)
    real positions only and spreads them back to (B, L) just for the attention scores: on
    ML-1M at L=200, 44% of a batch's (B, L) positions are padding.
    """

    def __init__(self, mask: Tensor) -> None:
        self.batch, self.length = mask.shape
        self.index = mask.reshape(-1).nonzero().squeeze(1)  # (T,) flat positions b * L + l
        self.positions = self.index % self.length  # (T,) position l within its row
        self._mask = mask

    @functools.cached_property
    def from_newest(self) -> Tensor:
        """(T,) ``n - 1 - l``: 0 for each row's newest item (only ``position_origin: newest``)."""
        row_length = self._mask.sum(1)[self.index // self.length]  # (T,) real length n of its row
        return row_length - 1 - self.positions

    def unpack(self, packed: Tensor) -> Tensor:
        """(T, C) -> (B, L, C) with zeros at padding."""
        full = packed.new_zeros(self.batch * self.length, packed.shape[-1])
        return full.index_copy(0, self.index, packed).view(self.batch, self.length, -1)  # (B, L, C)

    def pack(self, full: Tensor) -> Tensor:
        """(B, L, C) -> (T, C)."""
        return full.reshape(self.batch * self.length, -1).index_select(0, self.index)  # (T, C)


def _causal_attention_with_dropout(q: Tensor, k: Tensor, v: Tensor, p: float) -> Tensor:
    """SDPA's math path, with the cheaper CPU dropout mask of ``models/dropout.py``.

    With dropout on the weights, CPU ``scaled_dot_product_attention`` takes this same unfused
    path anyway, but draws its mask with ``bernoulli_``. The causal mask is an additive bias
    that the score GEMM accumulates onto, rather than a separate masking pass.
    """
    b, h, length, dh = q.shape
    future = torch.full((length, length), float("-inf"), dtype=q.dtype, device=q.device).triu_(
        1
    )  # (L, L)
    scores = torch.baddbmm(
        future.expand(b * h, length, length),
        q.reshape(b * h, length, dh),
        k.reshape(b * h, length, dh).transpose(1, 2),
        alpha=dh**-0.5,
    )  # (B*H, L, L)
    weights = dropout(torch.softmax(scores, dim=-1), p, True)  # (B*H, L, L)
    return (weights @ v.reshape(b * h, length, dh)).view(b, h, length, dh)  # (B, H, L, Dh)


class SwiGLU(nn.Module):
    """``W2 (SiLU(W1 x) * W3 x)``, bias-free, dropout on the gated hidden units."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * ffn_dim, bias=False)  # W1 and W3 in one GEMM
        self.down = nn.Linear(ffn_dim, dim, bias=False)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.drop(F.silu(gate) * up))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(LN(x))``, then ``x + FFN(LN(x))`` (GELU FFN).

    ``kind="ligr"``: ``x + sigmoid(Ga x) * attn(LN(x))``, then ``x + sigmoid(Gf x) *
    SwiGLU(LN(x))``. The gates read the residual stream itself (not its norm), so each position
    learns how much of a branch to take in, a per-coordinate shortcut around one that does not help.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        dropout: float,
        attention_dropout: float,
        kind: BlockKind = "pre_ln",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, attention_dropout)
        self.norm2 = nn.LayerNorm(dim)
        gated = kind == "ligr"
        self.ffn: nn.Module = (
            SwiGLU(dim, ffn_dim, dropout)
            if gated
            else nn.Sequential(
                nn.Linear(dim, ffn_dim), nn.GELU(), Dropout(dropout), nn.Linear(ffn_dim, dim)
            )
        )
        self.attn_gate = nn.Linear(dim, dim) if gated else None
        self.ffn_gate = nn.Linear(dim, dim) if gated else None
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, packing: Packing | None = None) -> Tensor:
        """(B, L, D), or the packed (T, D) real positions with their ``packing``."""
        h = self.drop(self.attn(self.norm1(x), packing))
        x = x + (h if self.attn_gate is None else torch.sigmoid(self.attn_gate(x)) * h)
        h = self.drop(self.ffn(self.norm2(x)))
        return x + (h if self.ffn_gate is None else torch.sigmoid(self.ffn_gate(x)) * h)
