"""The two-tower model's configuration: its fields, their checks and the names derived from them.

Kept apart from the model (:mod:`recforge.models.two_tower`), which re-exports both names for
code that imports them from there. Checkpoints store the config as a plain dict, so they do not
depend on where the class lives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from recforge.models.config_checks import FieldChecks
from recforge.models.item_table import check_item_table_fields
from recforge.models.towers import POOLINGS, PoolingKind, TowerConfig

USER_ID_KEY = "user_id"
"""KJT key (and table name) of the user id embedding."""


@dataclass
class TwoTowerConfig:
    num_items: int
    """N: item ids are 1..N and 0 is padding (table of N + 1 rows). 0 = take it from the data."""
    num_users: int = 0
    """User ids are 1..num_users (used by the unhashed user id table). 0 = take it from the data."""
    dim: int = 64
    """Item table width: the item id embedding and the pooled history."""
    out_dim: int = 64
    """Width of the shared (L2-normalised) user/item space."""
    feature_dim: int = 16
    """Width of each categorical/list feature table."""
    history_len: int = 50
    """H: the last H items of the history are pooled (must equal the data's ``history_len``)."""
    pooling: PoolingKind = "learned"
    """History pooling: ``mean``; ``exp_decay`` (weight of the item ``a`` steps before the most
    recent ∝ ``decay ** a``); ``learned`` (learned per-position logits, softmax over the real
    positions, initialised to ``exp_decay``)."""
    decay: float = 0.8
    """Recency decay of ``exp_decay`` and the initial weights of ``learned`` (in (0, 1])."""
    pooling_heads: int = 1
    """``learned``: independent position weightings, concatenated (head k starts at
    ``decay ** (1 / 2^k)``, so later heads look further back)."""
    use_user_id: bool = False
    """Add a user id embedding to the user tower."""
    user_id_dim: int = 32
    """Width of the user id table."""
    user_id_hash_buckets: int = 0
    """> 0: hash user ids into this many rows (unbounded / unseen ids); 0: one row per user id."""
    item_tower: TowerConfig = field(default_factory=TowerConfig)
    """Item tower MLP."""
    user_tower: TowerConfig = field(default_factory=TowerConfig)
    """User tower MLP."""
    temperature: float = 0.05
    """Logits (cosines) are divided by it."""
    in_batch_negatives: bool = True
    """Use the other rows' targets as negatives."""
    num_negatives: int = 0
    """Uniform negatives per step shared by the batch (mixed negative sampling; 0 = none)."""
    logq_correction: bool = True
    """Subtract the log expected sample count of each candidate (sampling-bias correction)."""
    item_feature_cardinalities: dict[str, int] = field(default_factory=dict)
    """Item categorical/list features used (KJT key ``item_<name>``) -> table rows. Filled from
    the data by the training module (after its ``item_features`` selection)."""
    user_feature_cardinalities: dict[str, int] = field(default_factory=dict)
    """User categorical features used (KJT key ``user_<name>``) -> table rows. Filled from the
    data."""
    item_numeric_features: list[str] = field(default_factory=list)
    """Item numeric features used (columns of the item dense buffer). Filled from the data."""
    user_numeric_features: list[str] = field(default_factory=list)
    """User numeric features used (columns of ``user_dense``). Filled from the data."""
    table_name: str = "item_table"
    """Name of the item table (not ``items``: it collides with ``ModuleDict.items``)."""

    def __post_init__(self) -> None:
        if isinstance(self.item_tower, Mapping):  # from a plain dict (e.g. saved hyperparameters)
            self.item_tower = TowerConfig(**self.item_tower)
        if isinstance(self.user_tower, Mapping):
            self.user_tower = TowerConfig(**self.user_tower)

        check = FieldChecks(self)
        need = check.need
        check.integers(
            "num_items",
            "num_users",
            "dim",
            "out_dim",
            "feature_dim",
            "history_len",
            "pooling_heads",
            "user_id_dim",
            "user_id_hash_buckets",
            "num_negatives",
        )
        check.booleans("use_user_id", "in_batch_negatives", "logq_correction")
        check.finite_numbers("decay", "temperature")
        check_item_table_fields(check)
        need(self.num_users >= 0, "num_users", "must be >= 1 (or 0: taken from the data)")
        for name in (
            "dim",
            "out_dim",
            "feature_dim",
            "history_len",
            "pooling_heads",
            "user_id_dim",
        ):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        need(self.pooling in POOLINGS, "pooling", f"must be one of {POOLINGS}")
        need(0.0 < self.decay <= 1.0, "decay", "must be in (0, 1]")
        need(
            self.pooling == "learned" or self.pooling_heads == 1,
            "pooling_heads",
            "must be 1 unless pooling='learned'",
        )
        need(
            self.user_id_hash_buckets >= 0, "user_id_hash_buckets", "must be >= 0 (0 = no hashing)"
        )
        need(self.temperature > 0, "temperature", "must be > 0")
        need(self.num_negatives >= 0, "num_negatives", "must be >= 0")
        need(
            self.in_batch_negatives or self.num_negatives > 0,
            "num_negatives",
            "must be > 0 when in_batch_negatives is false (no negatives otherwise)",
        )
        check.feature_cardinalities("item_feature_cardinalities", "user_feature_cardinalities")
        for name in ("item_numeric_features", "user_numeric_features"):
            need(isinstance(getattr(self, name), list), name, "must be a list of feature names")
        need(
            "id" not in self.user_feature_cardinalities,
            "user_feature_cardinalities",
            f"a user feature named 'id' would clash with the '{USER_ID_KEY}' key",
        )

    # --- derived names ---

    @property
    def item_feature_keys(self) -> list[str]:
        """KJT keys (= table names) of the item features, in order."""
        return [f"item_{name}" for name in self.item_feature_cardinalities]

    @property
    def user_feature_keys(self) -> list[str]:
        """KJT keys (= table names) of the user features, in order."""
        return [f"user_{name}" for name in self.user_feature_cardinalities]

    @property
    def user_id_rows(self) -> int:
        return self.user_id_hash_buckets if self.user_id_hash_buckets > 0 else self.num_users + 1
