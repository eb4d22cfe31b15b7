"""The towers of the two-tower model and their parts, on plain tensors (no TorchRec), so an
exporter can run them after ordinary ``nn.Embedding``/``nn.EmbeddingBag`` lookups.
See :mod:`recforge.models.two_tower` for the model that feeds them; the towers take their widths
as arguments rather than reading its config, so this module does not depend on that one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PoolingKind = Literal["mean", "exp_decay", "learned"]
POOLINGS: tuple[PoolingKind, ...] = ("mean", "exp_decay", "learned")

# User id hashing: ((id mod P) * A + C) mod P mod buckets. P = 2^31 - 1 and A < 2^31 keep the
# product below 2^62, so int64 never overflows, and any int64 id (even negative) maps to a row.
_HASH_P = 2_147_483_647
_HASH_A = 1_103_515_245
_HASH_C = 12_345


def hash_user_ids(ids: Tensor, buckets: int) -> Tensor:
    """Rows ``0..buckets-1`` of (unbounded) int64 user ids: a fixed universal-style hash."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    ids = ids.to(torch.int64)
    return ((ids % _HASH_P) * _HASH_A + _HASH_C) % _HASH_P % buckets


def signed_log1p(x: Tensor) -> Tensor:
    """``sign(x) log(1 + |x|)``: tames heavy-tailed numeric features (prices, counts)."""
    return torch.sign(x) * torch.log1p(x.abs())


@dataclass
class TowerConfig:
    """The MLP of one tower: input -> hidden layers (GELU, dropout) -> ``out_dim`` -> L2 norm."""

    hidden: list[int] = field(default_factory=lambda: [128])
    """Hidden layer widths; ``[]`` is a single linear map to the output."""
    dropout: float = 0.0
    """Dropout on the tower input and after each hidden layer."""

    def __post_init__(self) -> None:
        if not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in self.hidden):
            raise ValueError(f"TowerConfig.hidden={self.hidden!r}: widths must be integers >= 1")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"TowerConfig.dropout={self.dropout!r}: must be in [0, 1)")


def _mlp(in_dim: int, config: TowerConfig, out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Dropout(config.dropout)]
    width = in_dim
    for hidden in config.hidden:
        layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(config.dropout)]
        width = hidden
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class HistoryPooling(nn.Module):
    """Position-aware pooling of a right-padded, time-ordered history (B, H, D) -> (B, heads * D).

    The item at position ``j`` of a row of length ``l`` has *age* ``a = l - 1 - j`` (0 = most
    recent). Its weight is ``softmax_j(logit[a])`` over the row's real positions only: padding
    gets weight exactly 0, and an empty history pools to a zero vector.
    """

    def __init__(self, mode: PoolingKind, history_len: int, decay: float, heads: int = 1) -> None:
        super().__init__()
        self.mode, self.heads = mode, heads
        age = torch.arange(history_len, dtype=torch.float32)[:, None]  # (H, 1)
        decays = torch.tensor([decay ** (1.0 / 2**k) for k in range(heads)])  # (heads,)
        logits = age * decays.log()[None, :]  # (H, heads)
        if mode == "mean":
            logits = torch.zeros(history_len, 1)
        if mode == "learned":
            self.position_logits = nn.Parameter(logits)
        else:
            self.register_buffer("position_logits", logits, persistent=False)

    def weights(self, lengths: Tensor, length: int) -> Tensor:
        """Pooling weights (B, H, heads); rows sum to 1 (0 for an empty history)."""
        j = torch.arange(length, device=lengths.device)
        lengths = lengths.to(torch.int64)
        mask = j[None, :] < lengths[:, None]  # (B, H)
        age = (lengths[:, None] - 1 - j[None, :]).clamp(
            0, self.position_logits.shape[0] - 1
        )  # (B, H)
        logits = self.position_logits[age]  # (B, H, heads)
        # A finite fill keeps an all-padding row NaN-free; the mask then zeroes it.
        logits = logits.masked_fill(~mask[..., None], torch.finfo(logits.dtype).min)
        return torch.softmax(logits, dim=1) * mask[..., None].to(logits.dtype)

    def forward(self, history: Tensor, lengths: Tensor) -> Tensor:
        b, length, dim = history.shape
        w = self.weights(lengths, length)  # (B, H, heads)
        return torch.einsum("bhk,bhd->bkd", w, history).reshape(b, self.heads * dim)


class ItemTower(nn.Module):
    """``[id embedding, pooled features, numeric features] -> MLP -> L2 norm``.

    Args:
        id_dim: width of the item id embedding.
        feature_dim: total width of the pooled item features (0: none).
        num_numeric: item numeric features (already standardised by the caller).
        mlp: the tower MLP.
        out_dim: width of the shared user/item space.
    """

    def __init__(
        self, id_dim: int, feature_dim: int, num_numeric: int, mlp: TowerConfig, out_dim: int
    ) -> None:
        super().__init__()
        self.in_dim = id_dim + feature_dim + num_numeric
        self.mlp = _mlp(self.in_dim, mlp, out_dim)

    def forward(self, id_emb: Tensor, feature_emb: Tensor, dense: Tensor) -> Tensor:
        """(n, dim), (n, feature_dim * item features), (n, item numeric) -> (n, out_dim), unit
        rows."""
        x = torch.cat([id_emb, feature_emb, dense.to(id_emb.dtype)], dim=1)
        return F.normalize(self.mlp(x), dim=-1)


class UserTower(nn.Module):
    """``[pooled history, user id embedding, pooled features, numeric features] -> MLP -> L2 norm``.

    Args:
        pooling: the history pooling (``heads * item_dim`` wide output).
        item_dim: width of the history's item embeddings.
        id_and_feature_dim: total width of the user id embedding and pooled user features (0: none).
        num_numeric: user numeric features (raw; standardised here, see :attr:`dense_mean`).
        mlp: the tower MLP.
        out_dim: width of the shared user/item space.
    """

    def __init__(
        self,
        pooling: HistoryPooling,
        item_dim: int,
        id_and_feature_dim: int,
        num_numeric: int,
        mlp: TowerConfig,
        out_dim: int,
    ) -> None:
        super().__init__()
        self.pooling = pooling
        self.in_dim = pooling.heads * item_dim + id_and_feature_dim + num_numeric
        self.mlp = _mlp(self.in_dim, mlp, out_dim)
        # Standardisation of signed_log1p(user numeric features), set from the data.
        self.register_buffer("dense_mean", torch.zeros(num_numeric), persistent=False)
        self.register_buffer("dense_std", torch.ones(num_numeric), persistent=False)

    def forward(
        self, history: Tensor, lengths: Tensor, id_and_feature_emb: Tensor, dense: Tensor
    ) -> Tensor:
        """history (B, H, D) right-padded, lengths (B,), (B, user id + feature widths), raw numeric
        features (B, user numeric) -> (B, out_dim), unit rows."""
        pooled = self.pooling(history, lengths)
        dense = (signed_log1p(dense.to(pooled.dtype)) - self.dense_mean) / self.dense_std
        x = torch.cat([pooled, id_and_feature_emb, dense], dim=1)
        return F.normalize(self.mlp(x), dim=-1)
