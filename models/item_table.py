"""The item table of SASRec and the two-tower model, and the sampling statistics of its logQ
correction.

Both models keep their item embeddings in a TorchRec ``EmbeddingCollection`` holding one table
(N + 1 rows, row 0 = padding) read by three KJT keys: ``history``, ``target`` and ``candidates``
(negatives while training, the whole catalogue when scoring). A step looks the table up **once**,
with one KJT holding all three, so a fused optimizer (``apply_optimizer_in_backward``) applies
exactly one update per row per step (docs/architecture.md §5). Every key has batch size B;
candidates shared by the batch sit in row 0 of ``candidates`` and its other rows are empty.

Sampled softmax needs, per candidate, the log of how many times a step is expected to draw it:
``log(T p(i) + M / N)`` with T in-batch draws ~ p (the training frequency, from
:meth:`ItemTableModel.set_item_frequencies`) and M uniform draws over the N items
(:meth:`ItemTableModel.sample_uniform_items`).
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recforge.models.config_checks import FieldChecks
from recforge.models.losses import log_sampling_probability

ITEM_KEYS = ("history", "target", "candidates")
"""The KJT keys of the item table, in the order every lookup uses."""
EC_MODULE = "embedding_collection"
"""Attribute (and ``named_modules`` path) of the item ``EmbeddingCollection``."""


class ItemTableConfig(Protocol):
    """The fields of a model config that shape the item table."""

    num_items: int
    dim: int
    table_name: str


def check_item_table_fields(check: FieldChecks) -> None:
    """The config rules of ``num_items`` and ``table_name`` (after the type checks)."""
    c = check.config
    check.need(c.num_items >= 0, "num_items", "must be >= 1 (or 0: taken from the data)")
    check.need(
        isinstance(c.table_name, str)
        and c.table_name.isidentifier()
        and c.table_name not in dir(nn.ModuleDict),
        "table_name",
        "must be an identifier that is not a ModuleDict attribute (e.g. not 'items')",
    )


class ItemTableModel(nn.Module):
    """Base of the models that own the item table; see the module docstring.

    A base class rather than a submodule because checkpoints, the sharding plan and the
    exporters address the table as ``embedding_collection.embeddings.<table_name>.weight`` and
    the sampling distribution as ``log_item_prob``, at the top of the model. Subclasses narrow
    ``config`` to their own config class.

    ``device`` places only the ``EmbeddingCollection`` (``"meta"`` when
    ``DistributedModelParallel`` will shard and materialise it).
    """

    config: ItemTableConfig

    def __init__(self, config: ItemTableConfig, device: torch.device | str = "cpu") -> None:
        if config.num_items == 0:
            raise ValueError(
                f"{type(config).__name__}.num_items=0: set it to the number of items (e.g. "
                f"dataclasses.replace(config, num_items=...)) before building {type(self).__name__}"
            )
        super().__init__()
        self.config = config
        # Rows ~ U(-a, a) with a = sqrt(3 / D): unit-norm rows, so dot products with a
        # layer-normed or unit query start with unit variance. Set as bounds (not an init_fn)
        # because TorchRec's sharded kernels read only the bounds when they materialise a table.
        bound = math.sqrt(3.0 / config.dim)
        self.embedding_collection = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=config.table_name,
                    num_embeddings=config.num_items + 1,
                    embedding_dim=config.dim,
                    feature_names=list(ITEM_KEYS),
                    weight_init_min=-bound,
                    weight_init_max=bound,
                )
            ],
            device=torch.device(device),
        )
        # log p(i) of the in-batch sampling distribution (p ∝ training frequency), index 0
        # unused; uniform until set_item_frequencies(). Persistent so checkpoints resume alike.
        self.register_buffer(
            "log_item_prob", torch.full((config.num_items + 1,), -math.log(config.num_items))
        )

    @property
    def item_table(self) -> nn.Embedding:
        """The unsharded item table (N + 1 rows), e.g. for export; absent once sharded."""
        embeddings = getattr(self.embedding_collection, "embeddings", None)
        name = self.config.table_name
        if not isinstance(embeddings, nn.ModuleDict) or name not in embeddings:
            raise RuntimeError(
                "item_table: the EmbeddingCollection is sharded; gather the table first "
                f"(state-dict key '{EC_MODULE}.embeddings.{name}.weight')"
            )
        return embeddings[name]

    def set_item_frequencies(self, counts: Tensor | np.ndarray) -> None:
        """Set the in-batch sampling distribution from training counts (N + 1,), index 0 ignored.

        ``p(i) = max(count_i, 1) / sum_j max(count_j, 1)``: an item with no count is treated as
        seen once so that its log q stays finite.
        """
        log_p = log_sampling_probability(counts, self.config.num_items)
        self.log_item_prob.copy_(log_p.to(self.log_item_prob))

    def sample_uniform_items(self, count: int, device: torch.device | str) -> Tensor:
        """``count`` ids drawn uniformly from 1..N (what :meth:`log_expected_count` assumes of the
        uniform draws); a draw may equal a target, which the loss masks as an accidental hit."""
        return torch.randint(1, self.config.num_items + 1, (count,), device=device)

    def log_expected_count(self, ids: Tensor, in_batch_draws: int, uniform_draws: int) -> Tensor:
        """``log(T p(i) + M / N)``: expected times item i is among a step's sampled candidates,
        with ``T = in_batch_draws`` drawn ~ p and ``M = uniform_draws`` uniform ones (at least one
        of them > 0); the logQ correction subtracts this from every candidate's logit."""
        terms = []
        if in_batch_draws > 0:
            terms.append(self.log_item_prob[ids] + math.log(in_batch_draws))
        if uniform_draws > 0:
            terms.append(
                torch.full(
                    ids.shape,
                    math.log(uniform_draws / self.config.num_items),
                    dtype=self.log_item_prob.dtype,
                    device=ids.device,
                )
            )
        return terms[0] if len(terms) == 1 else torch.logaddexp(terms[0], terms[1])

    def lookup_items(
        self,
        batch_size: int,
        history: tuple[Tensor, Tensor],
        target: tuple[Tensor, Tensor] | None,
        candidates: Tensor,
        candidate_lengths: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The step's one ``EmbeddingCollection`` call; returns the looked-up rows of each key.

        ``history`` and ``target`` are ``(ids, lengths)``: the ids row-major, without padding,
        with per-row lengths (B,); ``target`` None looks none up. ``candidates`` go in row 0
        unless ``candidate_lengths`` (B,) spreads them over the rows.
        """
        history_ids, history_lengths = history
        device = history_ids.device
        if target is None:
            target = (
                torch.zeros(0, dtype=torch.int64, device=device),
                torch.zeros(batch_size, dtype=torch.int32, device=device),
            )
        if candidate_lengths is None:
            candidate_lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)
            if batch_size:
                candidate_lengths[0] = candidates.numel()
        per_key = [
            history_ids.to(torch.int64),
            target[0].to(device=device, dtype=torch.int64),
            candidates.to(device=device, dtype=torch.int64),
        ]
        values = torch.cat(per_key)
        lengths = torch.cat(
            [
                lens.to(device=device, dtype=torch.int32)
                for lens in (history_lengths, target[1], candidate_lengths)
            ]
        )
        kjt = KeyedJaggedTensor(
            keys=list(ITEM_KEYS), values=values, lengths=lengths, stride=batch_size
        )
        out = self.embedding_collection(kjt)
        ids = dict(zip(ITEM_KEYS, per_key, strict=True))
        return self.extend_rows({key: out[key].values() for key in ITEM_KEYS}, ids)

    def extend_rows(self, rows: dict[str, Tensor], ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """What a model adds to its looked-up table rows (per key, the rows of ``ids[key]``);
        nothing here. SASRec adds item attributes, so every reader of a row sees the sum."""
        return rows
