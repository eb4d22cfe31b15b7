"""Item attributes added to SASRec's item rows: ``row(i) = table[i] + sum_f mean(attr_f(i))``.

In a sparse catalogue most item rows are trained on a handful of interactions; attributes
(category path, brand) are shared by many items, so a rare item inherits what its attributes
learned from the frequent ones. The sum is used wherever SASRec reads an item row: the history it
encodes, the targets and the candidates it scores (the output stays tied to the input). For export
the whole sum is computed once per item (:meth:`ItemAttributes.rows`), so the exported
graph and the serving contract are those of a model without attributes.

The attribute tables are small dense ``nn.EmbeddingBag`` s (mean pooling), trained by the dense
optimizer and replicated on every rank like the other dense layers; only the item table is
sharded. Every item's codes are kept as a padded (N + 1, K) buffer (K = the most codes any item
has; padding code = the table's last row, excluded from the mean), set from the prepared data by
:meth:`ItemAttributes.set_codes` and not saved in the state dict: they belong to the data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from recforge.models.ragged import checked_codes


class AttributeBag(nn.EmbeddingBag):
    """Mean-pooled attribute vectors; the last row is padding (zero, excluded from the mean)."""

    def __init__(self, cardinality: int, dim: int) -> None:
        super().__init__(cardinality + 1, dim, mode="mean", padding_idx=cardinality)

    def reset_parameters(self) -> None:
        # The item table's U(-a, a), a = sqrt(3 / D): unit-norm rows, so an item's attribute
        # mean starts no larger than its own row.
        bound = math.sqrt(3.0 / self.embedding_dim)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.weight[self.padding_idx].zero_()


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
        for name, card in self.cardinalities.items():
            # Until set_codes(): every item has no attribute (a zero sum).
            self.register_buffer(
                f"codes_{name}", torch.full((num_items + 1, 1), card), persistent=False
            )

    def set_codes(self, sparse: Mapping[str, tuple[Any, Any]]) -> None:
        """Every item's codes per feature, ``(offsets (N + 2,), codes)`` indexed by item id."""
        missing = [name for name in self.cardinalities if name not in sparse]
        if missing:
            raise ValueError(f"set_codes: no codes for item feature(s) {missing}")
        rows = self.num_items + 1
        for name, card in self.cardinalities.items():
            offsets, codes = checked_codes(name, *sparse[name], rows, card)
            lengths = offsets.diff()  # (N + 1,)
            width = max(int(lengths.max()), 1)
            padded = torch.full((rows, width), card, dtype=torch.int64)
            row = torch.repeat_interleave(torch.arange(rows), lengths)
            column = torch.arange(codes.numel()) - torch.repeat_interleave(offsets[:-1], lengths)
            padded[row, column] = codes
            old = getattr(self, f"codes_{name}")
            setattr(self, f"codes_{name}", padded.to(old.device))

    def forward(self, ids: Tensor) -> Tensor:
        """(n,) item ids -> (n, D): the sum over features of each item's mean attribute vector
        (zero for an item with no code, and for padding id 0)."""
        out: Tensor | None = None
        for name in self.cardinalities:
            bag = self.embedding_bags[f"item_{name}"]
            pooled = bag(getattr(self, f"codes_{name}")[ids])  # (n, D)
            out = pooled if out is None else out + pooled
        assert out is not None, "ItemAttributes with no feature"
        return out
