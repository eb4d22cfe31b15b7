"""The LightningModule that trains and evaluates the two-tower model on TorchRec shards."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from recforge.data.feature_tables import load_feature_tables
from recforge.models.two_tower import TwoTower
from recforge.models.two_tower_config import TwoTowerConfig
from recforge.trainer.recommender_module import (
    DenseOptimizerConfig,
    EvalConfig,
    ShardedRecommenderModule,
)
from recforge.trainer.sharding import EmbeddingOptimizerConfig, ShardingConfig


class TwoTowerModule(ShardedRecommenderModule):
    """Trains :class:`recforge.models.two_tower.TwoTower` on ``history`` batches.

    The network is built and sharded in ``configure_model``; the item table
    (``model.table_name``) and every feature table (named like its KJT key: ``item_<name>``,
    ``user_<name>``, ``user_id``) can be given a sharding type in ``sharding.sharding_types``.
    Evaluation embeds the catalogue once per validation/test epoch (:meth:`prepare_evaluation`)
    and scores each batch's user vectors against it.
    """

    def __init__(
        self,
        model: TwoTowerConfig,
        item_features: list[str] | None = None,
        user_features: list[str] | None = None,
        optimizer: DenseOptimizerConfig = DenseOptimizerConfig(),
        embedding_optimizer: EmbeddingOptimizerConfig = EmbeddingOptimizerConfig(),
        sharding: ShardingConfig = ShardingConfig(),
        evaluation: EvalConfig = EvalConfig(),
        seed: int = 0,
    ) -> None:
        """
        Args:
            model: architecture and loss. ``num_items: 0`` / ``num_users: 0`` take the counts from
                the data; the ``*_feature_cardinalities`` and ``*_numeric_features`` fields are
                filled from the data (leave them empty).
            item_features: item features of the prepared data to use (categorical, list or
                numeric, by name); None: all of them, []: none.
            user_features: the same for user features.
            optimizer: dense-parameter optimizer.
            embedding_optimizer: fused optimizer of the item and feature tables.
            sharding: per-table sharding types (auto by default).
            evaluation: metric cut-offs and segments.
            seed: base of the per-step RNG reseed (dropout, negatives).
        """
        super().__init__(optimizer, embedding_optimizer, sharding, evaluation, seed)
        self.save_hyperparameters()
        self.config = model
        self.item_features, self.user_features = item_features, user_features
        self._user_dense_columns: list[int] = []
        self._catalog: torch.Tensor | None = None

    # --- building ---

    @property
    def max_len(self) -> int:
        # Not read by history batches; the same window keeps the data's config consistent.
        return self.config.history_len

    @property
    def history_len(self) -> int:
        return self.config.history_len

    @staticmethod
    def _select(
        side: str, wanted: list[str] | None, sparse: dict[str, int], numeric: list[str]
    ) -> tuple[dict[str, int], list[str]]:
        available = [*sparse, *numeric]
        if wanted is None:
            return dict(sparse), list(numeric)
        unknown = [name for name in wanted if name not in available]
        if unknown:
            raise ValueError(
                f"{side}_features: {unknown} not in the data's {side} features {available}"
            )
        return (
            {k: v for k, v in sparse.items() if k in wanted},
            [k for k in numeric if k in wanted],
        )

    def resolve_config(self, dm: Any) -> TwoTowerConfig:
        """The model config with counts and features taken from the datamodule."""
        config = self.config
        for name, value in (("num_items", dm.num_items), ("num_users", dm.num_users)):
            given = getattr(config, name)
            if given == 0:
                config = replace(config, **{name: value})
            elif given != value:
                raise ValueError(
                    f"model.{name}={given} but the data has {value} "
                    "(set 0 to take it from the data)"
                )
        item_sparse, item_numeric = self._select(
            "item", self.item_features, dm.item_feature_cardinalities, dm.item_numeric_features
        )
        user_sparse, user_numeric = self._select(
            "user", self.user_features, dm.user_feature_cardinalities, dm.user_numeric_features
        )
        for name, value in (
            ("item_feature_cardinalities", item_sparse),
            ("user_feature_cardinalities", user_sparse),
            ("item_numeric_features", item_numeric),
            ("user_numeric_features", user_numeric),
        ):
            given = getattr(config, name)
            if given and given != value:
                raise ValueError(
                    f"model.{name}={given!r} disagrees with the data ({value!r}); leave it empty "
                    "(it is filled from the data) "
                    "and select features with item_features/user_features"
                )
            config = replace(config, **{name: value})
        self._user_dense_columns = [dm.user_numeric_features.index(name) for name in user_numeric]
        return config

    def build_model(self, dm: Any) -> tuple[TwoTower, list[torch.nn.Parameter]]:
        config = self.config = self.resolve_config(dm)
        model = TwoTower(config, device=torch.device("meta"))
        self.set_data_state(model, dm)
        params = list(model.embedding_collection.parameters())
        if model.feature_collection is not None:
            params += list(model.feature_collection.parameters())
        return model, params

    @staticmethod
    def set_data_state(model: TwoTower, dm: Any) -> None:
        """Give ``model`` what it takes from the data: item frequencies (logQ), every item's
        feature codes and numeric values, and the user numeric features' statistics."""
        config = model.config
        model.set_item_frequencies(torch.as_tensor(dm.item_counts, dtype=torch.float32))
        if not (
            config.item_feature_cardinalities
            or config.item_numeric_features
            or config.user_numeric_features
        ):
            return
        tables = load_feature_tables(dm.data_dir, dm.manifest)
        items, users = tables.item, tables.user
        item_cols = [items.dense_names.index(name) for name in config.item_numeric_features]
        model.set_item_features(
            {name: items.sparse_columns[name] for name in config.item_feature_cardinalities},
            items.dense[:, item_cols] if item_cols else None,
        )
        user_cols = [users.dense_names.index(name) for name in config.user_numeric_features]
        if user_cols:
            model.set_user_feature_stats(users.dense[1:][:, user_cols])

    # --- steps ---

    def _user_dense(self, batch: dict[str, Any]) -> torch.Tensor | None:
        if not self._user_dense_columns:
            return None
        return batch["user_dense"][:, self._user_dense_columns]

    def training_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        # Through the DMP wrapper, so its DistributedDataParallel synchronises dense gradients.
        loss, _ = self.net(batch["features"], self._user_dense(batch), batch["weight"])
        return loss

    def prepare_evaluation(self) -> None:
        if self._item_scoring is not None:
            return  # item-chunked or item-sharded: the base class embeds this rank's rows
        # Every rank embeds the whole catalogue (collective lookups: all ranks call it).
        with torch.no_grad():
            ids = torch.arange(1, self.config.num_items + 1, device=self.device)
            self._catalog = self.model.item_vectors(ids)

    def finish_evaluation(self) -> None:
        self._catalog = None

    def score_batch(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model.score_all(
            batch["features"], self._user_dense(batch), catalog=self._catalog
        )  # (B, N + 1)

    def eval_user_vectors(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model.user_vectors(batch["features"], self._user_dense(batch))  # (B, D)

    def eval_item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.item_vectors(ids)  # item tower outputs (n, D)

    def prepare_for_export(self, network: TwoTower, dm: Any) -> None:
        """Give a network whose meta tensors were just materialised (``recforge export``) what
        the checkpoint does not hold: the data-derived buffers of :meth:`set_data_state`."""
        self.set_data_state(network, dm)
