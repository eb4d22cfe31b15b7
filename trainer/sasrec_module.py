"""The LightningModule that trains and evaluates SASRec on TorchRec shards."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from recforge.data.feature_tables import load_feature_tables
from recforge.models.sasrec import SASRec, SASRecConfig
from recforge.trainer.recommender_module import (
    DenseOptimizerConfig,
    EvalConfig,
    ShardedRecommenderModule,
)
from recforge.trainer.sharding import EmbeddingOptimizerConfig, ShardingConfig


class SASRecModule(ShardedRecommenderModule):
    """Trains :class:`recforge.models.sasrec.SASRec`; the network is built and sharded in
    ``configure_model``."""

    def __init__(
        self,
        model: SASRecConfig,
        optimizer: DenseOptimizerConfig = DenseOptimizerConfig(),
        embedding_optimizer: EmbeddingOptimizerConfig = EmbeddingOptimizerConfig(),
        sharding: ShardingConfig = ShardingConfig(),
        evaluation: EvalConfig = EvalConfig(),
        seed: int = 0,
        item_features: tuple[str, ...] = (),
    ) -> None:
        """
        Args:
            model: SASRec architecture and loss. ``num_items: 0`` takes the count from the data.
            optimizer: dense-parameter optimizer.
            embedding_optimizer: fused optimizer of the item table.
            sharding: per-table sharding types (auto by default).
            evaluation: metric cut-offs and segments.
            seed: base of the per-step RNG reseed (dropout, negatives), so a resumed run
                continues exactly like an uninterrupted one.
            item_features: categorical/list item features of the prepared data whose mean
                attribute vectors are added to every item row (``models/item_attributes.py``);
                none by default.
        """
        super().__init__(optimizer, embedding_optimizer, sharding, evaluation, seed)
        self.save_hyperparameters()
        self.config = model
        self.item_features = list(item_features)

    @property
    def max_len(self) -> int:
        return self.config.max_len

    @property
    def history_len(self) -> int:
        # Not read by sequence batches; the same window keeps the data's config consistent.
        return self.config.max_len

    def build_model(self, dm: Any) -> tuple[SASRec, list[torch.nn.Parameter]]:
        config = self.config
        if config.num_items == 0:
            config = replace(config, num_items=dm.num_items)
        elif config.num_items != dm.num_items:
            raise ValueError(
                f"model.num_items={config.num_items} but the data has {dm.num_items} items "
                f"(set 0 to take it from the data)"
            )
        config = self.config = replace(
            config, item_feature_cardinalities=self._feature_cardinalities(config, dm)
        )
        model = SASRec(config, device=torch.device("meta"))
        self.set_data_state(model, dm)
        return model, list(model.embedding_collection.parameters())

    def _feature_cardinalities(self, config: SASRecConfig, dm: Any) -> dict[str, int]:
        available = dm.item_feature_cardinalities
        unknown = [name for name in self.item_features if name not in available]
        if unknown:
            raise ValueError(
                f"item_features: {unknown} not among the data's categorical/list item features "
                f"{list(available)} (in {dm.data_dir})"
            )
        wanted = {name: available[name] for name in self.item_features}
        given = config.item_feature_cardinalities
        if given and given != wanted:
            raise ValueError(
                f"model.item_feature_cardinalities={given!r} disagrees with the data ({wanted!r});"
                " leave it empty (it is filled from the data) and select features with "
                "item_features"
            )
        return wanted

    @staticmethod
    def set_data_state(model: SASRec, dm: Any) -> None:
        """Give ``model`` what it takes from the data and no checkpoint holds: the item
        frequencies (logQ) and, with item features, every item's attribute codes."""
        model.set_item_frequencies(torch.as_tensor(dm.item_counts, dtype=torch.float32))
        features = model.config.item_feature_cardinalities
        if features:
            items = load_feature_tables(dm.data_dir, dm.manifest).item
            model.set_item_features({name: items.sparse_columns[name] for name in features})

    def training_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        # Through the DMP wrapper, so its DistributedDataParallel synchronises dense gradients.
        loss, _ = self.net(
            batch["input_ids"], batch["lengths"], batch["target_ids"], batch["weight"]
        )
        return loss

    def score_batch(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model.score_all(batch["input_ids"], batch["lengths"])  # (B, N + 1)

    def eval_user_vectors(self, batch: dict[str, Any]) -> torch.Tensor:
        # score_all's user side: the final hidden state at each row's last position.
        m, ids, lengths = self.model, batch["input_ids"], batch["lengths"]
        mask = m._check_inputs(ids, lengths)
        none = torch.zeros(0, dtype=torch.int64, device=ids.device)
        emb = m.lookup_items(ids.shape[0], (ids[mask], lengths), None, none)
        return m.user_vector(m._hidden(emb["history"], mask, lengths), lengths)  # (B, D)

    def eval_item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        # score_all's item side: the item table's rows (tied output), through the sharded lookup.
        none = torch.zeros(0, dtype=torch.int64, device=ids.device)
        history = (none, torch.zeros(1, dtype=torch.int32, device=ids.device))
        return self.model.lookup_items(1, history, None, ids.reshape(-1))["candidates"]

    def prepare_for_export(self, network: SASRec, dm: Any) -> None:
        """Nothing to add (``recforge export``): :meth:`build_model` already ran
        :meth:`set_data_state`, whose attribute codes are CPU buffers that materialising the
        meta tables leaves alone, and the checkpoint then loads the item frequencies."""
