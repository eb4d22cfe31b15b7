"""Two-tower retrieval: a user tower and an item tower mapping into one L2-normalised space.

- **Item tower**: item id embedding + pooled item categorical/list features (+ numeric
  features) -> MLP -> L2 norm.
- **User tower**: position-aware pooling of the user's recent history (the last ``history_len``
  items, looked up in the *same* item table) + optional user id embedding (optionally hashed)
  + pooled user categorical features (+ numeric features) -> MLP -> L2 norm.
- **Loss**: sampled softmax (``recforge.models.losses.sampled_softmax``) over in-batch negatives
  (the other rows' targets) and optional uniform negatives shared by the batch (mixed negative
  sampling), at a temperature, with logQ (sampling-bias) correction from item frequencies and
  accidental-hit masking.

TorchRec layout (docs/architecture.md §5):

- ``embedding_collection``: the shared item table (:mod:`recforge.models.item_table`; an
  ``EmbeddingCollection``, not a bag: the history is pooled with per-position weights), read by
  ``history``, ``target`` and ``candidates`` (uniform negatives while training, the whole
  catalogue when scoring) in one lookup per step.
- ``feature_collection``: an ``EmbeddingBagCollection`` (mean pooling) with one table per
  categorical/list feature, named like its KJT key (``item_<name>``, ``user_<name>``), and the
  ``user_id`` table when ``use_user_id``. It is also looked up once per step: the KJT has
  stride ``S = max(n, B)``; item keys fill rows ``0..n-1`` (the n items being embedded:
  targets + negatives, or the catalogue), user keys rows ``0..B-1``; the other rows are empty.

Item features are needed for *any* item id (negatives, the catalogue), not only for the targets
a batch carries, so the model keeps every item's feature codes as buffers
(:meth:`TwoTower.set_item_features`, from the prepared data) and builds the feature KJT from
them; the ``item_<name>`` keys and ``item_dense`` of a data batch are not read. User features
come with the batch (``user_<name>`` keys of the batch KJT, ``user_dense``), so a user unseen
in training can be served from its features and history.

The towers (:class:`ItemTower`, :class:`UserTower`) take plain dense tensors (no TorchRec),
so an exporter can run them after ordinary ``nn.Embedding``/``nn.EmbeddingBag`` lookups.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from recforge.models.item_table import EC_MODULE as EC_MODULE  # re-exported: its path in this model
from recforge.models.item_table import ItemTableModel
from recforge.models.losses import sampled_softmax
from recforge.models.ragged import checked_codes, gather_ragged, pad_ragged
from recforge.models.towers import (
    HistoryPooling,
    ItemTower,
    UserTower,
    hash_user_ids,
    signed_log1p,
)
from recforge.models.two_tower_config import USER_ID_KEY as USER_ID_KEY  # re-exported
from recforge.models.two_tower_config import TwoTowerConfig as TwoTowerConfig  # re-exported

EBC_MODULE = "feature_collection"
"""Attribute of the feature ``EmbeddingBagCollection`` (absent when there are no such tables)."""


class TwoTower(ItemTableModel):
    """Two-tower retrieval model on TorchRec tables; see the module docstring.

    ``device`` places only the ``EmbeddingCollection``/``EmbeddingBagCollection`` (``"meta"``
    when ``DistributedModelParallel`` shards and materialises them); dense layers and buffers
    follow the ambient default device. Before training, call :meth:`set_item_frequencies`
    (logQ) and, with item or user features, :meth:`set_item_features` /
    :meth:`set_user_feature_stats` (data-derived buffers, not saved in the state dict).
    """

    config: TwoTowerConfig

    def __init__(self, config: TwoTowerConfig, device: torch.device | str = "cpu") -> None:
        super().__init__(config, device)
        c = config
        if c.use_user_id and c.user_id_hash_buckets == 0 and c.num_users == 0:
            raise ValueError(
                "TwoTowerConfig.num_users=0 with use_user_id and no hashing: set the number of "
                "users (or user_id_hash_buckets) before building TwoTower"
            )
        device = torch.device(device)
        # Feature rows ~ U(-a, a), a = sqrt(3 / width), as the item table's (item_table.py).
        bags: list[EmbeddingBagConfig] = []
        if c.use_user_id:
            b = math.sqrt(3.0 / c.user_id_dim)
            bags.append(
                EmbeddingBagConfig(
                    name=USER_ID_KEY,
                    num_embeddings=c.user_id_rows,
                    embedding_dim=c.user_id_dim,
                    feature_names=[USER_ID_KEY],
                    pooling=PoolingType.SUM,
                    weight_init_min=-b,
                    weight_init_max=b,
                )
            )
        b = math.sqrt(3.0 / c.feature_dim)
        for key, rows in zip(
            c.item_feature_keys + c.user_feature_keys,
            [*c.item_feature_cardinalities.values(), *c.user_feature_cardinalities.values()],
        ):
            bags.append(
                EmbeddingBagConfig(
                    name=key,
                    num_embeddings=rows,
                    embedding_dim=c.feature_dim,
                    feature_names=[key],
                    pooling=PoolingType.MEAN,
                    weight_init_min=-b,
                    weight_init_max=b,
                )
            )
        self.feature_collection = (
            EmbeddingBagCollection(tables=bags, device=device) if bags else None
        )
        self._bag_keys = [t.feature_names[0] for t in bags]
        self.item_tower = ItemTower(
            c.dim,
            c.feature_dim * len(c.item_feature_cardinalities),
            len(c.item_numeric_features),
            c.item_tower,
            c.out_dim,
        )
        self.user_tower = UserTower(
            HistoryPooling(c.pooling, c.history_len, c.decay, c.pooling_heads),
            c.dim,
            (c.user_id_dim if c.use_user_id else 0)
            + c.feature_dim * len(c.user_feature_cardinalities),
            len(c.user_numeric_features),
            c.user_tower,
            c.out_dim,
        )
        # Every item's feature codes (jagged: offsets (N + 2,), codes) and standardised numeric
        # features (N + 1, k); empty until set_item_features(). Data-derived, not saved.
        for i in range(len(c.item_feature_cardinalities)):
            self.register_buffer(
                f"item_offsets_{i}",
                torch.zeros(c.num_items + 2, dtype=torch.int64),
                persistent=False,
            )
            self.register_buffer(
                f"item_codes_{i}", torch.zeros(0, dtype=torch.int64), persistent=False
            )
        self.register_buffer(
            "item_dense",
            torch.zeros(c.num_items + 1, len(c.item_numeric_features)),
            persistent=False,
        )

    # --------------------------------------------------------------------------- data-derived state

    def set_item_features(
        self, sparse: Mapping[str, tuple[Any, Any]], dense: Any | None = None
    ) -> None:
        """Every item's features, indexed by item id (row 0 = padding).

        Args:
            sparse: per item feature of the config, ``(offsets (N + 2,), codes)``: the codes of item
                ``i`` are ``codes[offsets[i]:offsets[i + 1]]`` (the layout of
                ``recforge.data.feature_tables.FeatureTable.sparse_columns``); codes lie in
                ``[0, cardinality)``.
            dense: (N + 1, len(item_numeric_features)) raw numeric features; stored as
                standardised ``signed_log1p`` values (statistics over rows 1..N).
        """
        c, n = self.config, self.config.num_items
        missing = [name for name in c.item_feature_cardinalities if name not in sparse]
        if missing:
            raise ValueError(f"set_item_features: no codes for item feature(s) {missing}")
        for i, (name, card) in enumerate(c.item_feature_cardinalities.items()):
            offsets, codes = checked_codes(name, *sparse[name], n + 1, card, "set_item_features")
            old = getattr(self, f"item_offsets_{i}")
            setattr(self, f"item_offsets_{i}", offsets.to(old.device))
            setattr(self, f"item_codes_{i}", codes.to(old.device))
        k = len(c.item_numeric_features)
        if k:
            if dense is None:
                raise ValueError(
                    f"set_item_features: dense values needed for {c.item_numeric_features}"
                )
            values = torch.as_tensor(np.asarray(dense), dtype=torch.float32)
            if values.shape != (n + 1, k):
                raise ValueError(
                    f"set_item_features: dense must be ({n + 1}, {k}), got {tuple(values.shape)}"
                )
            x = signed_log1p(torch.nan_to_num(values, nan=0.0))
            mean, std = x[1:].mean(0), x[1:].std(0, unbiased=False).clamp_min(1e-6)
            standard = (x - mean) / std
            standard[0] = 0.0
            self.item_dense = standard.to(self.item_dense)

    def set_user_feature_stats(self, dense: Any) -> None:
        """Standardisation of the user numeric features, from all users' raw values (U, k)."""
        k = len(self.config.user_numeric_features)
        values = torch.as_tensor(np.asarray(dense), dtype=torch.float32)
        if values.dim() != 2 or values.shape[1] != k:
            raise ValueError(
                f"set_user_feature_stats: expected (users, {k}) values, got {tuple(values.shape)}"
            )
        x = signed_log1p(torch.nan_to_num(values, nan=0.0))
        self.user_tower.dense_mean = x.mean(0).to(self.user_tower.dense_mean)
        self.user_tower.dense_std = (
            x.std(0, unbiased=False).clamp_min(1e-6).to(self.user_tower.dense_std)
        )

    def item_feature_codes(self, item_ids: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Per item feature key, ``(codes, lengths)`` of the rows ``item_ids`` (jagged)."""
        out = {}
        for i, key in enumerate(self.config.item_feature_keys):
            offsets, codes = getattr(self, f"item_offsets_{i}"), getattr(self, f"item_codes_{i}")
            ids = item_ids.to(offsets.device)
            starts = offsets[ids]
            lengths = offsets[ids + 1] - starts
            out[key] = (gather_ragged(codes, starts, lengths), lengths)
        return out

    # ----------------------------------------------------------------------------- lookups

    def _item_lookup(
        self, history: JaggedTensor, target: Tensor | None, candidates: Tensor, batch_size: int
    ) -> dict[str, Tensor]:
        """:meth:`lookup_items` of ``history`` (B rows), ``target`` (one id per row, or None)
        and ``candidates`` (all in row 0); returns the rows (n, D) of each key."""
        targets = (
            None
            if target is None
            else (target, torch.ones(batch_size, dtype=torch.int32, device=target.device))
        )
        return self.lookup_items(
            batch_size, (history.values(), history.lengths()), targets, candidates
        )

    def _feature_lookup(
        self, item_ids: Tensor, user: Mapping[str, JaggedTensor] | None, batch_size: int
    ) -> tuple[Tensor, Tensor]:
        """The step's one ``EmbeddingBagCollection`` call: pooled item features (n, F_item) of
        ``item_ids`` (from the buffers) and pooled user id + features (B, F_user) of ``user`` (the
        batch's ``user_id``/``user_<name>`` keys; None: no users, B = 0)."""
        c = self.config
        n = item_ids.numel()
        b = batch_size if user is not None else 0
        device = self.log_item_prob.device
        if self.feature_collection is None:
            return (torch.zeros(n, 0, device=device), torch.zeros(b, 0, device=device))
        stride = max(n, b, 1)
        rows: dict[str, tuple[Tensor, Tensor]] = (
            self.item_feature_codes(item_ids)
            if n
            else {
                key: (
                    torch.zeros(0, dtype=torch.int64, device=device),
                    torch.zeros(0, dtype=torch.int64, device=device),
                )
                for key in c.item_feature_keys
            }
        )
        user_keys = ([USER_ID_KEY] if c.use_user_id else []) + c.user_feature_keys
        for key in user_keys:
            if user is None:
                rows[key] = (
                    torch.zeros(0, dtype=torch.int64, device=device),
                    torch.zeros(0, dtype=torch.int64, device=device),
                )
                continue
            jt = user[key]
            values = jt.values().to(device=device, dtype=torch.int64)
            if key == USER_ID_KEY and c.user_id_hash_buckets > 0:
                values = hash_user_ids(values, c.user_id_hash_buckets)
            rows[key] = (values, jt.lengths().to(device=device, dtype=torch.int64))
        values, lengths = [], []
        for key in self._bag_keys:
            v, lens = rows[key]
            values.append(v)
            lengths.append(F.pad(lens, (0, stride - lens.numel())))
        kjt = KeyedJaggedTensor(
            keys=list(self._bag_keys),
            values=torch.cat(values),
            lengths=torch.cat(lengths).to(torch.int32),
            stride=stride,
        )
        pooled = self.feature_collection(kjt).to_dict()  # key -> (S, width)
        item_emb = (
            torch.cat([pooled[k][:n] for k in c.item_feature_keys], 1)
            if c.item_feature_keys
            else torch.zeros(n, 0, device=device)
        )
        user_emb = (
            torch.cat([pooled[k][:b] for k in user_keys], 1)
            if user_keys
            else torch.zeros(b, 0, device=device)
        )
        return item_emb, user_emb

    def _parse(
        self, features: KeyedJaggedTensor, need_target: bool
    ) -> tuple[dict[str, JaggedTensor], int]:
        keys = set(features.keys())
        needed = (
            ["history"]
            + (["target"] if need_target else [])
            + ([USER_ID_KEY] if self.config.use_user_id else [])
            + self.config.user_feature_keys
        )
        missing = [k for k in needed if k not in keys]
        if missing:
            raise ValueError(
                f"features: the KeyedJaggedTensor lacks key(s) {missing} (has {sorted(keys)})"
            )
        return features.to_dict(), features.stride()

    def _history_dense(self, history_emb: Tensor, lengths: Tensor) -> Tensor:
        """The looked-up history rows (row-major) as a right-padded (B, H, D) tensor."""
        c = self.config
        mask = (
            torch.arange(c.history_len, device=history_emb.device)
            < lengths.to(history_emb.device)[:, None]
        )
        if history_emb.shape[0] != int(mask.sum()):
            raise ValueError(
                f"history: rows longer than history_len={c.history_len} "
                f"(lengths {lengths.tolist()})"
            )
        return pad_ragged(history_emb, mask)

    def _user_vectors(
        self,
        history_emb: Tensor,
        history: JaggedTensor,
        user_emb: Tensor,
        user_dense: Tensor | None,
    ) -> Tensor:
        lengths = history.lengths().to(history_emb.device)
        b = lengths.numel()
        if user_dense is None:
            user_dense = history_emb.new_zeros(b, len(self.config.user_numeric_features))
        if user_dense.shape != (b, len(self.config.user_numeric_features)):
            raise ValueError(
                f"user_dense: expected ({b}, {len(self.config.user_numeric_features)}) "
                f"({self.config.user_numeric_features}), got {tuple(user_dense.shape)}"
            )
        return self.user_tower(
            self._history_dense(history_emb, lengths),
            lengths,
            user_emb,
            user_dense.to(history_emb.device),
        )

    # ----------------------------------------------------------------------------- public API

    def sample_negatives(self, device: torch.device | str) -> Tensor:
        """The step's ``num_negatives`` uniform negatives over 1..N (shared by the batch; may hit a
        target: such accidental hits are masked by the loss)."""
        return self.sample_uniform_items(self.config.num_negatives, device)

    def training_loss(
        self, features: KeyedJaggedTensor, user_dense: Tensor | None, weight: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Sampled-softmax loss of one batch, with one item-table and one feature-table lookup.

        Args:
            features: the batch KJT (``history``, ``target`` (one per row), ``user_id`` and
                ``user_<name>`` keys as the config needs; other keys are ignored).
            user_dense: (B, user numeric features) raw values, or None when there are none.
            weight: (B,) row weights.

        Returns:
            The weighted mean loss and stats: ``negatives`` (candidates per row before masking).
        """
        c = self.config
        d, b = self._parse(features, need_target=True)
        history, target_jt = d["history"], d["target"]
        targets = target_jt.values().to(torch.int64)
        if targets.numel() != b or (target_jt.lengths() != 1).any():
            raise ValueError("features: 'target' must hold exactly one item per row")
        device = targets.device
        negatives = self.sample_negatives(device)
        emb = self._item_lookup(history, targets, negatives, b)
        item_ids = torch.cat([targets, negatives])
        item_feat, user_feat = self._feature_lookup(item_ids, d, b)
        item_vec = self.item_tower(
            torch.cat([emb["target"], emb["candidates"]]),
            item_feat,
            self.item_dense[item_ids.to(self.item_dense.device)],
        )
        user_vec = self._user_vectors(emb["history"], history, user_feat, user_dense)
        has_negatives = negatives.numel() > 0
        log_q_target = log_q_negative = None
        if c.logq_correction:
            in_batch, m = (b if c.in_batch_negatives else 0), negatives.numel()
            log_q_target = self.log_expected_count(targets, in_batch, m)
            log_q_negative = (
                self.log_expected_count(negatives, in_batch, m) if has_negatives else None
            )
        loss = sampled_softmax(
            user_vec,
            item_vec[:b],
            targets,
            item_vec[b:] if has_negatives else None,
            negatives if has_negatives else None,
            in_batch=c.in_batch_negatives,
            log_q_target=log_q_target,
            log_q_negative=log_q_negative,
            temperature=c.temperature,
            weight=weight.to(user_vec.device),
        )
        stats = {
            "negatives": torch.tensor(
                (b if c.in_batch_negatives else 0) + negatives.numel(), device=device
            )
        }
        return loss, stats

    def item_vectors(self, item_ids: Tensor) -> Tensor:
        """Item vectors (n, out_dim) of any item ids (one item-table and one feature-table
        lookup)."""
        item_ids = item_ids.reshape(-1).to(torch.int64)
        empty = JaggedTensor(
            values=torch.zeros(0, dtype=torch.int64, device=item_ids.device),
            lengths=torch.zeros(1, dtype=torch.int32, device=item_ids.device),
        )
        emb = self._item_lookup(empty, None, item_ids, 1)
        item_feat, _ = self._feature_lookup(item_ids, None, 0)
        return self.item_tower(
            emb["candidates"], item_feat, self.item_dense[item_ids.to(self.item_dense.device)]
        )

    def user_vectors(self, features: KeyedJaggedTensor, user_dense: Tensor | None = None) -> Tensor:
        """User vectors (B, out_dim) from the batch KJT (one item-table and one feature-table
        lookup)."""
        d, b = self._parse(features, need_target=False)
        emb = self._item_lookup(d["history"], None, torch.zeros(0, dtype=torch.int64), b)
        _, user_feat = self._feature_lookup(
            torch.zeros(0, dtype=torch.int64, device=self.log_item_prob.device), d, b
        )
        return self._user_vectors(emb["history"], d["history"], user_feat, user_dense)

    def score_all(
        self,
        features: KeyedJaggedTensor,
        user_dense: Tensor | None = None,
        catalog: Tensor | None = None,
    ) -> Tensor:
        """Scores (B, N + 1) of every item (cosines; column 0, padding, is -inf).

        ``catalog``: precomputed :meth:`item_vectors` of ids 1..N (N, out_dim), e.g. once per
        evaluation epoch; without it, the catalogue is embedded here in the same lookups as the
        history (one item-table call, one feature-table call).
        """
        c = self.config
        if catalog is None:
            d, b = self._parse(features, need_target=False)
            ids = torch.arange(1, c.num_items + 1, device=d["history"].values().device)
            emb = self._item_lookup(d["history"], None, ids, b)
            item_feat, user_feat = self._feature_lookup(ids, d, b)
            catalog = self.item_tower(emb["candidates"], item_feat, self.item_dense[1:])
            user = self._user_vectors(emb["history"], d["history"], user_feat, user_dense)
        else:
            if catalog.shape != (c.num_items, c.out_dim):
                raise ValueError(
                    f"catalog: expected ({c.num_items}, {c.out_dim}), got {tuple(catalog.shape)}"
                )
            user = self.user_vectors(features, user_dense)
        return F.pad(user @ catalog.T, (1, 0), value=float("-inf"))  # (B, N + 1)

    def forward(
        self,
        features: KeyedJaggedTensor,
        user_dense: Tensor | None = None,
        weight: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]] | Tensor:
        """``training_loss`` when ``weight`` is given, else ``score_all``.

        Under ``DistributedModelParallel`` call the wrapper (``dmp(...)``) for training, so that
        its DistributedDataParallel sees a forward and synchronises dense gradients.
        """
        if weight is None:
            return self.score_all(features, user_dense)
        return self.training_loss(features, user_dense, weight)
