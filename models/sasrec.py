"""SASRec: a causal transformer over a user's item sequence, scored against the item table.

Kang & McAuley 2018, with pre-LN blocks and a choice of losses (``models/losses.py``):
full-catalog cross-entropy ("SASRec+"), sampled softmax with in-batch/uniform negatives and
logQ correction, or BCE with one negative (the paper's). Optionally each item row is its table row
plus the mean vectors of the item's attributes (:mod:`recforge.models.item_attributes`).

Item embeddings live in the shared item table (:mod:`recforge.models.item_table`): ``history``
(input ids), ``target`` (training targets) and ``candidates`` (the catalog or sampled
negatives; with ``bce``, one negative per position) in one lookup per step. Output scores are
tied to the same table.

Inputs are right-padded with 0 (``data/loader.py``), so the causal mask alone keeps real
positions from attending to padding: no padding mask, no fully masked attention rows, no
NaN, and ``encode`` exports to ONNX with ``is_causal=True`` (docs/architecture.md §11).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recforge.models.blocks import BLOCKS, Block, BlockKind, Packing
from recforge.models.config_checks import FieldChecks
from recforge.models.dropout import Dropout
from recforge.models.item_attributes import ItemAttributes
from recforge.models.item_table import EC_MODULE as EC_MODULE  # re-exported: its path in this model
from recforge.models.item_table import ItemTableModel, check_item_table_fields
from recforge.models.losses import bce_one_negative, full_softmax_ce, gbce, sampled_softmax
from recforge.models.ragged import pad_ragged

LossKind = Literal["ce", "sampled_softmax", "bce", "gbce"]
PositionOrigin = Literal["newest", "oldest"]
POSITION_ORIGINS: tuple[PositionOrigin, ...] = ("newest", "oldest")
LOSSES: tuple[LossKind, ...] = ("ce", "sampled_softmax", "bce", "gbce")


@dataclass
class SASRecConfig:
    num_items: int
    """N: item ids are 1..N and 0 is padding, so the table has N + 1 rows. 0 means "not known
    yet" (a config file leaving it to the data); resolve it before building :class:`SASRec`."""
    max_len: int = 50
    """Longest input sequence L (number of learned positions)."""
    position_origin: PositionOrigin = "newest"
    """Where the learned positions count from. ``newest``: position 0 is each sequence's most
    recent item, 1 the one before, ... (what SASRec's left-padded layout gives), so the item that
    predicts the next one has the same position whatever the history length. ``oldest``: position
    0 is the first item of the right-padded row (recforge before this option; the newest item's
    position then varies with the length and is rarely trained at the lengths seen in test)."""
    dim: int = 64
    """Embedding and hidden size D."""
    num_layers: int = 2
    """Transformer blocks."""
    num_heads: int = 1
    """Attention heads; must divide ``dim``."""
    ffn_mult: int = 4
    """Feed-forward width as a multiple of ``dim``."""
    block: BlockKind = "pre_ln"
    """``pre_ln``: ``x + attn(LN(x))``, then ``x + GELU-FFN(LN(x))`` (SASRec with pre-LN).
    ``ligr``: the gated residuals of LinkedIn's LiGR layer (as in eSASRec): each branch is
    scaled by ``sigmoid(W x)`` of the stream it is added to, and the FFN is SwiGLU."""
    dropout: float = 0.2
    """Dropout on the input embeddings and the residual branches."""
    attention_dropout: float = 0.0
    """Dropout on the attention weights. Off by default: any value > 0 computes attention
    unfused, with a (B, H, L, L) mask per layer (about 6% of a CPU step at L=200)."""
    loss: LossKind = "ce"
    """``ce`` (full catalog), ``sampled_softmax``, ``bce`` (one uniform negative per position)
    or ``gbce`` (gSASRec: ``num_negatives`` shared negatives, calibrated BCE)."""
    num_negatives: int = 256
    """Uniform negatives per step, shared by all positions (``sampled_softmax``, where it may
    be 0, and ``gbce``)."""
    gbce_calibration: float = 0.75
    """``gbce``: the calibration ``t`` in [0, 1] (0 = plain BCE; gSASRec's default 0.75)."""
    in_batch_negatives: bool = True
    """``sampled_softmax``: also use the targets of all positions in the batch as negatives."""
    logq_correction: bool = True
    """``sampled_softmax``: subtract the log expected sample count of each candidate."""
    temperature: float = 1.0
    """Logits are divided by it (``ce`` and ``sampled_softmax``; must stay 1 with ``bce``)."""
    table_name: str = "item_table"
    """Name of the TorchRec table (not ``items``: it collides with ``ModuleDict.items``)."""
    item_feature_cardinalities: dict[str, int] = field(default_factory=dict)
    """Item categorical/list features added to every item row (``models/item_attributes.py``)
    -> their number of codes. Filled from the data by the training module after its
    ``item_features`` selection; empty: items are their ids alone."""

    def __post_init__(self) -> None:
        check = FieldChecks(self)
        need = check.need
        check.integers(
            "num_items", "max_len", "dim", "num_layers", "num_heads", "ffn_mult", "num_negatives"
        )
        check.booleans("in_batch_negatives", "logq_correction")
        need(
            self.position_origin in POSITION_ORIGINS,
            "position_origin",
            f"must be one of {POSITION_ORIGINS}",
        )
        check.finite_numbers("dropout", "attention_dropout", "temperature", "gbce_calibration")
        check_item_table_fields(check)
        check.feature_cardinalities("item_feature_cardinalities")
        need(self.max_len >= 1, "max_len", "must be >= 1")
        need(self.dim >= 1, "dim", "must be >= 1")
        need(self.num_layers >= 0, "num_layers", "must be >= 0")
        need(
            self.num_heads >= 1 and self.dim % self.num_heads == 0,
            "num_heads",
            f"must be >= 1 and divide dim={self.dim}",
        )
        need(self.ffn_mult >= 1, "ffn_mult", "must be >= 1")
        need(self.block in BLOCKS, "block", f"must be one of {BLOCKS}")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(0.0 <= self.attention_dropout < 1.0, "attention_dropout", "must be in [0, 1)")
        need(self.loss in LOSSES, "loss", f"must be one of {LOSSES}")
        need(self.num_negatives >= 0, "num_negatives", "must be >= 0")
        need(self.temperature > 0, "temperature", "must be > 0")
        if self.loss == "sampled_softmax":
            need(
                self.in_batch_negatives or self.num_negatives > 0,
                "num_negatives",
                "must be > 0 when in_batch_negatives is false (no negatives otherwise)",
            )
        if self.loss == "gbce":
            need(self.num_negatives >= 1, "num_negatives", "must be >= 1 with loss='gbce'")
            need(0.0 <= self.gbce_calibration <= 1.0, "gbce_calibration", "must be in [0, 1]")
            need(self.num_items != 1, "num_items", "must be >= 2 with loss='gbce'")
        if self.loss in ("bce", "gbce"):
            need(
                self.temperature == 1.0,
                "temperature",
                f"must be 1 with loss={self.loss!r} (it uses raw logits)",
            )
        if self.loss == "bce":
            need(
                self.num_items != 1,
                "num_items",
                "must be >= 2 with loss='bce' (a negative must differ)",
            )


class SASRec(ItemTableModel):
    """SASRec over the TorchRec item table; see the module docstring.

    ``device`` places only the ``EmbeddingCollection`` (``"meta"`` when
    ``DistributedModelParallel`` will shard and materialise it); the dense layers follow the
    ambient default device and are moved by the caller. Before training with
    ``sampled_softmax`` and logQ, call :meth:`set_item_frequencies`; with
    ``item_feature_cardinalities``, :meth:`set_item_features` before reading any item row.
    """

    config: SASRecConfig

    def __init__(self, config: SASRecConfig, device: torch.device | str = "cpu") -> None:
        super().__init__(config, device)
        c = config
        # Positions keep nn.Embedding's N(0, 1) init, which DistributedModelParallel's
        # reset_parameters() reproduces if the model is built on meta; items are scaled by
        # sqrt(D) in encode() to the same per-coordinate scale.
        self.positions = nn.Embedding(c.max_len, c.dim)
        self.input_dropout = Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.dim, c.num_heads, c.ffn_mult * c.dim, c.dropout, c.attention_dropout, c.block)
            for _ in range(c.num_layers)
        )
        self.final_norm = nn.LayerNorm(c.dim)
        self.item_attributes = (
            ItemAttributes(c.item_feature_cardinalities, c.num_items, c.dim)
            if c.item_feature_cardinalities
            else None
        )

    # ----------------------------------------------------------------------------- helpers

    def extend_rows(self, rows: dict[str, Tensor], ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each row plus its item's attributes when the config has any: every reader of an item
        row (history, targets, candidates, the catalogue) goes through the lookup, so the
        output stays tied to the input."""
        if self.item_attributes is None:
            return rows
        return {key: rows[key] + self.item_attributes(ids[key]) for key in rows}

    def set_item_features(self, sparse: Mapping[str, tuple[Any, Any]]) -> None:
        """Every item's attribute codes (see :meth:`ItemAttributes.set_codes`); data-derived,
        so called after building (training) or loading (export) the model."""
        if self.item_attributes is None:
            raise ValueError("set_item_features: the config has no item_feature_cardinalities")
        self.item_attributes.set_codes(sparse)

    @torch.no_grad()
    def item_rows(self) -> Tensor:
        """(N + 1, D) every item's row as the model reads it (table + attributes), from the
        unsharded table: what an exported graph embeds and scores against. Without attributes,
        a detached view of the table."""
        table = self.item_table.weight
        if self.item_attributes is None:
            return table.detach()  # a view: the caller copies what it keeps
        ids = torch.arange(self.config.num_items + 1, device=table.device)
        return table.detach() + self.item_attributes(ids)

    def _check_inputs(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """The (B, L) mask of real positions, after checking shapes against the config."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected (B, L), got shape {tuple(input_ids.shape)}")
        b, length = input_ids.shape
        if length > self.config.max_len:
            raise ValueError(f"input_ids: length {length} > max_len={self.config.max_len}")
        if lengths.shape != (b,):
            raise ValueError(f"lengths: expected shape ({b},), got {tuple(lengths.shape)}")
        return torch.arange(length, device=input_ids.device) < lengths[:, None].to(
            input_ids.device
        )  # (B, L)

    def encode_packed(self, history_emb: Tensor, packing: Packing) -> Tensor:
        """``encode`` on the real positions only: (T, D) row-major item embeddings -> (T, D)
        hidden states, equal to ``encode(...)[mask]`` (the training path; see :class:`Packing`)."""
        dim = history_emb.shape[-1]
        index = (
            packing.from_newest if self.config.position_origin == "newest" else packing.positions
        )
        x = history_emb * math.sqrt(dim) + self.positions(index)  # (T, D)
        x = self.input_dropout(x)
        for block in self.blocks:
            x = block(x, packing)
        return self.final_norm(x)

    def _hidden(self, history_emb: Tensor, mask: Tensor, lengths: Tensor) -> Tensor:
        """Encode the looked-up history rows (row-major, like ``mask``'s true entries)."""
        return self.encode(pad_ragged(history_emb, mask), lengths)  # (B, L, D)

    # ----------------------------------------------------------------------------- public API

    def encode(self, input_emb: Tensor, lengths: Tensor) -> Tensor:
        """Hidden states (B, L, D) of right-padded item embeddings (B, L, D), zero at padding.

        Plain tensors only (no TorchRec), so the ONNX exporter can call it after an ordinary
        ``nn.Embedding`` lookup; what sits at padded positions of ``input_emb`` never reaches
        a real position, because padding is on the right and attention is causal.
        """
        b, length, dim = input_emb.shape
        steps = torch.arange(length, device=input_emb.device)  # (L,)
        mask = steps < lengths[:, None]  # (B, L)
        if self.config.position_origin == "newest":
            # n - 1 - l on real steps; padded steps (zeroed below, never attended to by a real
            # step) read row 0 rather than a negative index.
            index = (lengths[:, None].to(steps.dtype) - 1 - steps).clamp_min(0)  # (B, L)
            x = input_emb * math.sqrt(dim) + self.positions(index)  # (B, L, D)
        else:
            x = input_emb * math.sqrt(dim) + self.positions.weight[:length]  # (B, L, D)
        x = self.input_dropout(x)
        for block in self.blocks:
            x = block(x)
        # Padded steps hold garbage computed from positions alone; zero them so that nothing
        # downstream (pooling, an exported graph) can pick it up.
        return self.final_norm(x) * mask[..., None].to(x.dtype)

    def user_vector(self, hidden: Tensor, lengths: Tensor) -> Tensor:
        """The hidden state (B, D) at each row's last real position ``lengths - 1``.

        A row with length 0 gets position 0, which ``encode`` zeroed: a zero vector.
        """
        index = (lengths.to(torch.int64) - 1).clamp_min(0)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]  # (B, D)

    def training_loss(
        self, input_ids: Tensor, target_ids: Tensor, lengths: Tensor, weight: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one training batch and its stats, with one item-table lookup.

        Args:
            input_ids, target_ids: (B, L) right-padded; ``target_ids[b, l]`` follows
                ``input_ids[b, l]``. Entries at or past ``lengths`` are ignored.
            lengths: (B,) real positions per row.
            weight: (B,) row weights; each of a row's positions gets the row's weight.

        Returns:
            The weighted mean over real positions of the configured loss, and stats:
            ``tokens`` (number of real target positions) and, for ``sampled_softmax``,
            ``negatives`` (candidates per position before masking).
        """
        c = self.config
        mask = self._check_inputs(input_ids, lengths)
        if target_ids.shape != input_ids.shape:
            raise ValueError(
                f"target_ids: shape {tuple(target_ids.shape)} != input_ids {tuple(input_ids.shape)}"
            )
        b = input_ids.shape[0]
        history, targets = input_ids[mask], target_ids[mask]  # (T,) each, row-major
        position_weight = weight.to(input_ids.device)[:, None].expand_as(mask)[mask]  # (T,)
        num_tokens = targets.numel()
        device = input_ids.device

        candidate_lengths = None  # shared by the batch: all in row 0
        if c.loss == "ce":
            candidates = torch.arange(1, c.num_items + 1, device=device)
        elif c.loss in ("sampled_softmax", "gbce"):
            candidates = self.sample_uniform_items(c.num_negatives, device)
        else:
            # Uniform over the N - 1 items other than the target: draw from 1..N-1 and shift
            # the draws at or above the target up by one.
            candidates = torch.randint(1, c.num_items, (num_tokens,), device=device)
            candidates = candidates + (candidates >= targets).to(candidates.dtype)
            candidate_lengths = lengths
        emb = self.lookup_items(
            b, (history, lengths), (targets, lengths), candidates, candidate_lengths
        )
        query = self.encode_packed(emb["history"], Packing(mask))  # (T, D)

        stats: dict[str, Tensor] = {"tokens": torch.tensor(num_tokens, device=device)}
        if c.loss == "ce":
            loss = full_softmax_ce(
                query, emb["candidates"], targets - 1, position_weight, temperature=c.temperature
            )
        elif c.loss == "sampled_softmax":
            log_q_target = log_q_negative = None
            if c.logq_correction:
                log_q_target = self._log_expected_count(targets, num_tokens)
                log_q_negative = self._log_expected_count(candidates, num_tokens)
            loss = sampled_softmax(
                query,
                emb["target"],
                targets,
                emb["candidates"],
                candidates,
                in_batch=c.in_batch_negatives,
                log_q_target=log_q_target,
                log_q_negative=log_q_negative,
                temperature=c.temperature,
                weight=position_weight,
            )
            in_batch = num_tokens if c.in_batch_negatives else 0
            stats["negatives"] = torch.tensor(in_batch + c.num_negatives, device=device)
        elif c.loss == "gbce":
            loss = gbce(
                query,
                emb["target"],
                targets,
                emb["candidates"],
                candidates,
                num_items=c.num_items,
                calibration=c.gbce_calibration,
                weight=position_weight,
            )
            stats["negatives"] = torch.tensor(c.num_negatives, device=device)
        else:
            loss = bce_one_negative(query, emb["target"], emb["candidates"], position_weight)
        return loss, stats

    def _log_expected_count(self, ids: Tensor, num_tokens: int) -> Tensor:
        """:meth:`log_expected_count` of a step whose in-batch candidates are the targets of its
        ``num_tokens`` positions."""
        c = self.config
        return self.log_expected_count(
            ids, num_tokens if c.in_batch_negatives else 0, c.num_negatives
        )

    def score_all(self, input_ids: Tensor, lengths: Tensor) -> Tensor:
        """Scores (B, N + 1) of every item for the next position; column 0 (padding) is -inf.

        One lookup: the history and the whole catalog as ``candidates``. The temperature is
        left out, as it does not change a ranking.
        """
        c = self.config
        mask = self._check_inputs(input_ids, lengths)
        b = input_ids.shape[0]
        catalog_ids = torch.arange(1, c.num_items + 1, device=input_ids.device)
        emb = self.lookup_items(b, (input_ids[mask], lengths), None, catalog_ids)
        user = self.user_vector(self._hidden(emb["history"], mask, lengths), lengths)  # (B, D)
        scores = user @ emb["candidates"].T  # (B, N)
        return F.pad(scores, (1, 0), value=float("-inf"))  # (B, N + 1)

    def forward(
        self,
        input_ids: Tensor,
        lengths: Tensor,
        target_ids: Tensor | None = None,
        weight: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """``training_loss`` when ``target_ids`` is given, else ``score_all``.

        Under ``DistributedModelParallel`` call the wrapper (``dmp(...)``), not these methods,
        so that its DistributedDataParallel sees a forward and synchronises dense gradients.
        """
        if target_ids is None:
            return self.score_all(input_ids, lengths)
        if weight is None:
            weight = torch.ones(input_ids.shape[0], device=input_ids.device)
        return self.training_loss(input_ids, target_ids, lengths, weight)
