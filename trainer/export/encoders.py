"""The ONNX-exportable faces of the models: user encoders on padded tensors (docs/architecture.md
§9, §11).

TorchRec's KeyedJaggedTensor does not export, so each encoder copies the unsharded tables into
plain ``nn.Embedding`` modules and takes right-padded dense tensors. Each encoder also says how
it is exported: its input specs (names, dtypes, symbolic shapes), dynamic dimensions, random
inputs for the parity gate, and the item vectors that its user vectors are scored against.
Its ``kind`` (the artifact's) is the model's family in :mod:`recforge.families`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from recforge.families import ModelFamily, family_of_model
from recforge.models.towers import hash_user_ids

ITEM_TOWER_CHUNK = 65536
"""Items per pass of the two-tower item tower when the export computes every item's vector."""


def _frozen(weight: Tensor) -> nn.Embedding:
    return nn.Embedding.from_pretrained(weight.detach().clone(), freeze=True)


def _right_padded(
    batch: int, length: int, low: int, high: int, pad: int, generator: torch.Generator
) -> Tensor:
    """(B, length) random ids in [low, high], each row a random prefix then ``pad``; row 0 full."""
    ids = torch.randint(low, high + 1, (batch, length), generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length
    return torch.where(
        torch.arange(length)[None, :] < lengths[:, None], ids, torch.full_like(ids, pad)
    )


class SASRecUserEncoder(nn.Module):
    """Padded ``item_ids`` (B, L) -> user vectors (B, D): the last position's hidden state."""

    unit_vectors = False
    """Scores are raw inner products."""
    reads_user_features = False

    def __init__(self, sasrec: nn.Module) -> None:
        super().__init__()
        self.kind = family_of_model(sasrec).name
        self.sasrec = sasrec
        # The rows as the model reads them: with item attributes, their sum is baked in here.
        self.items = _frozen(sasrec.item_rows())
        self.config = sasrec.config
        self.max_length = sasrec.config.max_len
        self.out_dim = sasrec.config.dim
        self.names = ["item_ids"]

    def forward(self, item_ids: Tensor) -> Tensor:
        lengths = (item_ids != 0).sum(dim=1)  # (B,) right padding: real items come first
        hidden = self.sasrec.encode(self.items(item_ids), lengths)  # (B, L, D)
        return self.sasrec.user_vector(hidden, lengths)  # (B, D)

    def input_specs(self) -> list[dict[str, Any]]:
        n, L = self.config.num_items, self.max_length
        return [
            {
                "name": "item_ids",
                "dtype": "int64",
                "shape": ["batch", "length"],
                "range": [0, n],
                "max_width": L,
                "doc": f"item indexes 1..{n}, right-padded with 0, length <= {L}",
            }
        ]

    def dynamic_shapes(self, batch: Any, length: Any) -> tuple:
        return ({0: batch, 1: length},)

    def random_inputs(
        self, batch: int, length: int, generator: torch.Generator
    ) -> tuple[Tensor, ...]:
        return (_right_padded(batch, length, 1, self.config.num_items, 0, generator),)

    @torch.no_grad()
    def item_vectors(self) -> np.ndarray:
        # A view of the encoder's own table (no copy): (N, D), row i - 1 = item i. Read-only use.
        return self.items.weight[1:].numpy().astype(np.float32, copy=False)


class TwoTowerUserEncoder(nn.Module):
    """The two-tower user tower on padded tensors.

    Inputs, in order (only those the model uses):

    - ``item_ids`` (B, H') int64: the most recent history, oldest first, right-padded with 0;
      H' <= history_len (pooling weights depend on recency, not on the width);
    - ``user_idx`` (B,) int64: the user's training index (1..num_users), 0 = unknown user (its id
      embedding is then zero);
    - ``user_<name>`` (B, W) int64 per user categorical/list feature: codes, right-padded with
      -1; the rows are mean-pooled as the training ``EmbeddingBagCollection`` did (no code: zero);
    - ``user_dense`` (B, k) float32: raw numeric user features (missing = 0, as in training).
    """

    unit_vectors = True
    """Both towers end in unit vectors: scores are cosines."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.kind = family_of_model(model).name
        c = model.config
        self.config = c
        self.max_length = c.history_len
        self.out_dim = c.out_dim
        self.items = _frozen(model.embedding_collection.embeddings[c.table_name].weight)
        bags = (
            model.feature_collection.embedding_bags if model.feature_collection is not None else {}
        )
        self.user_id = _frozen(bags["user_id"].weight) if c.use_user_id else None
        self.user_features = nn.ModuleList(
            [_frozen(bags[key].weight) for key in c.user_feature_keys]
        )
        self.tower = model.user_tower
        self.names = (
            ["item_ids"]
            + (["user_idx"] if c.use_user_id else [])
            + list(c.user_feature_keys)
            + (["user_dense"] if c.user_numeric_features else [])
        )
        # The item tower over every item, once, in eval mode (not part of the exported graph),
        # ITEM_TOWER_CHUNK items at a time into one (N, out_dim) array: the tower's activations
        # for a million items at once would be several times the result.
        training = model.training
        model.eval()
        self._item_vectors = np.empty((c.num_items, c.out_dim), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, c.num_items, ITEM_TOWER_CHUNK):
                stop = min(start + ITEM_TOWER_CHUNK, c.num_items)
                self._item_vectors[start:stop] = model.item_vectors(
                    torch.arange(start + 1, stop + 1)
                ).numpy()
        model.train(training)

    @property
    def reads_user_features(self) -> bool:
        """Whether the tower takes user feature codes or numbers (not only history and id)."""
        return bool(self.config.user_feature_cardinalities or self.config.user_numeric_features)

    def forward(self, item_ids: Tensor, *user: Tensor) -> Tensor:
        c = self.config
        lengths = (item_ids != 0).sum(dim=1)  # (B,)
        history = self.items(item_ids)  # (B, H', D); padding rows get pooling weight 0
        parts: list[Tensor] = []
        rest = list(user)
        if self.user_id is not None:
            idx = rest.pop(0)
            rows = hash_user_ids(idx, c.user_id_hash_buckets) if c.user_id_hash_buckets > 0 else idx
            parts.append(
                self.user_id(rows) * (idx != 0).to(history.dtype)[:, None]
            )  # (B, user_id_dim)
        for table in self.user_features:
            codes = rest.pop(0)  # (B, W)
            valid = (codes >= 0).to(history.dtype)
            summed = (table(codes.clamp_min(0)) * valid[..., None]).sum(dim=1)  # (B, feature_dim)
            parts.append(summed / valid.sum(dim=1).clamp_min(1.0)[:, None])
        b = item_ids.shape[0]
        dense = rest.pop(0) if c.user_numeric_features else history.new_zeros(b, 0)
        emb = torch.cat(parts, dim=1) if parts else history.new_zeros(b, 0)
        return self.tower(history, lengths, emb, dense)

    def input_specs(self) -> list[dict[str, Any]]:
        c = self.config
        specs = [
            {
                "name": "item_ids",
                "dtype": "int64",
                "shape": ["batch", "length"],
                "range": [0, c.num_items],
                "max_width": c.history_len,
                "doc": f"recent history item indexes 1..{c.num_items}, oldest first, "
                f"right-padded with 0, length <= {c.history_len}",
            }
        ]
        if c.use_user_id:
            top = 2**63 - 1 if c.user_id_hash_buckets else c.num_users
            specs.append(
                {
                    "name": "user_idx",
                    "dtype": "int64",
                    "shape": ["batch"],
                    "range": [0, top],
                    "doc": "user index from users.parquet (user_idx); 0 = unknown user",
                }
            )
        for key, card in zip(c.user_feature_keys, c.user_feature_cardinalities.values()):
            specs.append(
                {
                    "name": key,
                    "dtype": "int64",
                    "shape": ["batch", f"{key}_width"],
                    "range": [-1, card - 1],
                    "max_width": 1024,
                    "doc": f"codes 0..{card - 1} of user feature {key[len('user_') :]!r}, "
                    "right-padded with -1",
                }
            )
        if c.user_numeric_features:
            specs.append(
                {
                    "name": "user_dense",
                    "dtype": "float32",
                    "shape": ["batch", len(c.user_numeric_features)],
                    "doc": f"raw user numeric features {c.user_numeric_features} (missing = 0)",
                }
            )
        return specs

    def dynamic_shapes(self, batch: Any, length: Any) -> tuple:
        from torch.export import Dim

        shapes: list[dict[int, Any]] = [{0: batch, 1: length}]
        if self.config.use_user_id:
            shapes.append({0: batch})
        for key in self.config.user_feature_keys:
            shapes.append({0: batch, 1: Dim(f"{key}_width", min=1, max=1024)})
        if self.config.user_numeric_features:
            shapes.append({0: batch})
        # forward(item_ids, *user): the varargs get a nested tuple, absent when empty.
        return (shapes[0], tuple(shapes[1:])) if len(shapes) > 1 else (shapes[0],)

    def random_inputs(
        self, batch: int, length: int, generator: torch.Generator
    ) -> tuple[Tensor, ...]:
        c = self.config
        out = [_right_padded(batch, length, 1, c.num_items, 0, generator)]
        if c.use_user_id:
            users = c.user_id_hash_buckets * 4 if c.user_id_hash_buckets else c.num_users
            out.append(torch.randint(0, users + 1, (batch,), generator=generator))
        for card in c.user_feature_cardinalities.values():
            out.append(_right_padded(batch, 3, 0, card - 1, -1, generator))
        if c.user_numeric_features:
            out.append(torch.randn(batch, len(c.user_numeric_features), generator=generator) * 10)
        return tuple(out)

    def item_vectors(self) -> np.ndarray:
        return self._item_vectors  # (N, out_dim), row i - 1 = item i


def user_encoder(family: ModelFamily, network: nn.Module) -> nn.Module:
    """The exportable user encoder of a loaded network of ``family``, in eval mode."""
    return family.load("user_encoder")(network).eval()
