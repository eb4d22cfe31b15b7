"""Item attributes added to SASRec's item rows: ``row(i) = table[i] + sum_f mean(attr_f(i))``.

In a sparse catalogue most item rows are trained on a handful of interactions; attributes
(category path, brand) are shared by many items, so a rare item inherits what its attributes
learned from the frequent ones. The sum is used wherever SASRec reads an item row: the history it
encodes, the targets and the candidates it scores (the output stays tied to the input). For export
the whole sum is computed once per item (``SASRec.item_rows``), so the exported graph and the
serving contract are those of a model without attributes.

The attribute tables are small dense ``nn.EmbeddingBag`` modules (mean pooling), trained by
the dense optimizer and replicated on every rank like the other dense layers; only the item
table is sharded. Their rows are the codes of the prepared data (0 = missing, then one per
value), as in the two-tower feature tables. Every item's codes are kept ragged (offsets
(N + 2,) and the codes), set from the prepared data by :meth:`ItemAttributes.set_codes` and not
saved in the state dict: they belong to the data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from recforge.models.ragged import checked_codes, gather_ragged


class AttributeBag(nn.EmbeddingBag):
    """Mean-pooled attribute vectors, one row per code."""

    def __init__(self, cardinality: int, dim: int) -> None:
        super().__init__(cardinality, dim, mode="mean")

    def reset_parameters(self) -> None:
        # The item table's U(-a, a), a = sqrt(3 / D): unit-norm rows, so each feature's mean
        # starts on the scale of the item's own row (with F features the sum, F times that).
        bound = math.sqrt(3.0 / self.embedding_dim)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)


class ItemAttributes(nn.Module):
    """Per item feature a mean-pooled bag; :meth:`forward` sums them for a set of item ids."""

    def __init__(self, cardinalities: Mapping[str, int], num_items: int, dim: int) -> None:
        super().__init__()
        self.cardinalities = dict(cardinalities)
        self.num_items = num_items
        # Keyed like the two-tower feature tables (``item_<name>``), so that a warm start maps
        # their rows by feature value (``trainer/warm_start.py``).
        self.embedding_bags = nn.ModuleDict(
            {f"item_{name}": AttributeBag(c, dim) for name, c in cardinalities.items()}
        )
        # Until set_codes() the codes are unknown, and reading a row is an error rather than a
        # silent table-only row (which an export's parity gate would not notice).
        self.codes_set = False
        for name in self.cardinalities:
            self.register_buffer(
                f"offsets_{name}", torch.zeros(num_items + 2, dtype=torch.int64), persistent=False
            )
            self.register_buffer(
                f"codes_{name}", torch.zeros(0, dtype=torch.int64), persistent=False
            )

    def set_codes(self, sparse: Mapping[str, tuple[Any, Any]]) -> None:
        """Every item's codes per feature, ``(offsets (N + 2,), codes)`` indexed by item id."""
        missing = [name for name in self.cardinalities if name not in sparse]
        if missing:
            raise ValueError(f"set_codes: no codes for item feature(s) {missing}")
        for name, card in self.cardinalities.items():
            offsets, codes = checked_codes(
                name, *sparse[name], self.num_items + 1, card, "set_item_features"
            )
            device = getattr(self, f"offsets_{name}").device
            setattr(self, f"offsets_{name}", offsets.to(device))
            setattr(self, f"codes_{name}", codes.to(device))
        self.codes_set = True

    def forward(self, ids: Tensor) -> Tensor:
        """(n,) item ids -> (n, D): the sum over features of each item's mean attribute vector
        (zero for an item with no code, and for padding id 0)."""
        if not self.codes_set:
            raise RuntimeError(
                "item attributes: no codes set; call SASRec.set_item_features() with the prepared "
                "data's item features (the training module and the exporter do)"
            )
        ids = ids.to(torch.int64)
        out: Tensor | None = None
        for name in self.cardinalities:
            offsets = getattr(self, f"offsets_{name}")
            starts = offsets[ids]
            lengths = offsets[ids + 1] - starts  # (n,)
            codes = gather_ragged(getattr(self, f"codes_{name}"), starts, lengths)
            bag_offsets = torch.cumsum(lengths, 0) - lengths
            pooled = self.embedding_bags[f"item_{name}"](codes, bag_offsets)  # (n, D)
            out = pooled if out is None else out + pooled
        assert out is not None, "ItemAttributes with no feature"
        return out
