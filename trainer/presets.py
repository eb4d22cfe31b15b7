"""Presets: training settings derived from a prepared dataset's manifest statistics.

``preset: auto`` in a SASRec config (``configs/sasrec/auto.yaml``) fills ``max_len``,
``num_layers``, ``dropout``, ``early_stopping.patience`` and, for the optimizers whose rules
they are (:data:`TABLE_RULES_FOR`), the item table's learning rate, weight decay and its mode,
from the data's manifest statistics (:mod:`recforge.data.stats`), so a new dataset gets
sensible values without hand-tuning; any of them a config or the command line sets explicitly
wins. The CLI side is ``RecforgeCLI.parse_arguments`` (``trainer/lightning_cli.py``);
``recforge tune --enqueue-base`` resolves the same values (:func:`resolve_preset`).

The rules, with the two reference datasets they were chosen from and why, are one table in
docs/architecture.md (§6, "Settings derived from the data"); the constants below are its
numbers. "Dense" means at least ``DENSE_ITEM_INTERACTIONS`` interactions per item on average.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

INIT_ARGS = "model.init_args"
MODEL = f"{INIT_ARGS}.model"
MAX_LEN = f"{MODEL}.max_len"
NUM_LAYERS = f"{MODEL}.num_layers"
DROPOUT = f"{MODEL}.dropout"
TABLE_LR = f"{INIT_ARGS}.embedding_optimizer.lr"
TABLE_DECAY = f"{INIT_ARGS}.embedding_optimizer.weight_decay"
TABLE_DECAY_MODE = f"{INIT_ARGS}.embedding_optimizer.weight_decay_mode"
PATIENCE = "early_stopping.patience"
TABLE_OPTIMIZER = f"{INIT_ARGS}.embedding_optimizer.name"
TABLE_RULES_FOR = {
    "rowwise_adagrad": (TABLE_LR, TABLE_DECAY, TABLE_DECAY_MODE),
    "adagrad": (TABLE_LR,),  # its fbgemm kernel has no decay
}
"""The item-table settings whose rules hold for each embedding optimizer: the rates and the
decay were measured with row-wise Adagrad, and an Adagrad rate means nothing to sgd or adam."""

DENSE_ITEM_INTERACTIONS = 50.0
MAX_LEN_PERCENTILE = "p95"
MAX_LEN_MULTIPLE = 8
MAX_LEN_RANGE = (16, 200)
PATIENCE_TIERS = ((300_000, 30), (3_000_000, 20))
PATIENCE_LARGE = 10
TABLE_LR_DENSE, TABLE_LR_SPARSE = 0.05, 0.13
TABLE_DECAY_DENSE, TABLE_DECAY_SPARSE = 0.0, 1e-3


class PresetError(ValueError):
    """An unknown preset, a preset for another model family, or a manifest it cannot read."""


@dataclass(frozen=True)
class Derived:
    """One setting a preset derived: the config key, its value, and why."""

    key: str
    value: int | float | str
    statistic: str
    """The manifest statistic it came from, with its value."""
    rule: str

    def describe(self) -> str:
        return f"{self.key} = {self.value} ({self.statistic}; {self.rule})"


def _statistic(manifest: Mapping[str, Any], entry: str, field: str) -> float:
    try:
        return float(manifest[entry][field])
    except (KeyError, TypeError):
        raise PresetError(
            f"the manifest has no {entry}.{field}: written by an older `recforge data prepare`; "
            "read it with recforge.data.stats.with_statistics (or re-prepare the data)"
        ) from None


def derive_max_len(p95: float) -> int:
    low, high = MAX_LEN_RANGE
    rounded = MAX_LEN_MULTIPLE * math.ceil(p95 / MAX_LEN_MULTIPLE)
    return min(max(rounded, low), high)


def derive_patience(train_interactions: int) -> int:
    for below, patience in PATIENCE_TIERS:
        if train_interactions < below:
            return patience
    return PATIENCE_LARGE


def sasrec_auto(manifest: Mapping[str, Any]) -> dict[str, Derived]:
    """SASRec's data-dependent settings from a manifest that holds the shape statistics
    (``train_length``, ``item_interactions``, ``split_counts``), keyed by config key."""
    p95 = _statistic(manifest, "train_length", MAX_LEN_PERCENTILE)
    per_item = _statistic(manifest, "item_interactions", "mean")
    train = int(_statistic(manifest, "split_counts", "train_interactions"))
    dense = per_item >= DENSE_ITEM_INTERACTIONS
    density = f"{per_item:.1f} interactions per item"
    low, high = MAX_LEN_RANGE
    tiers = ", ".join(f"< {below:,}: {p}" for below, p in PATIENCE_TIERS)
    derived = [
        Derived(
            MAX_LEN,
            derive_max_len(p95),
            f"p95 training length {p95:g}",
            f"p95 rounded up to a multiple of {MAX_LEN_MULTIPLE}, clamped to [{low}, {high}]",
        ),
        Derived(
            NUM_LAYERS,
            2 if dense else 1,
            density,
            f"2 if >= {DENSE_ITEM_INTERACTIONS:g} per item (dense), else 1",
        ),
        Derived(
            DROPOUT,
            0.2 if dense else 0.5,
            density,
            f"0.2 if >= {DENSE_ITEM_INTERACTIONS:g} per item (dense), else 0.5",
        ),
        Derived(
            TABLE_LR,
            TABLE_LR_DENSE if dense else TABLE_LR_SPARSE,
            density,
            f"{TABLE_LR_DENSE:g} if >= {DENSE_ITEM_INTERACTIONS:g} per item (dense), "
            f"else {TABLE_LR_SPARSE:g} (rates for the Adagrad family, the default optimizer)",
        ),
        Derived(
            TABLE_DECAY,
            TABLE_DECAY_DENSE if dense else TABLE_DECAY_SPARSE,
            density,
            f"{TABLE_DECAY_DENSE:g} if >= {DENSE_ITEM_INTERACTIONS:g} per item (dense), "
            f"else {TABLE_DECAY_SPARSE:g}",
        ),
        Derived(
            TABLE_DECAY_MODE,
            "decoupled",
            "no statistic",
            "always decoupled, the mode the decay was measured in (a step shrinks a row by "
            "lr x decay)",
        ),
        Derived(
            PATIENCE,
            derive_patience(train),
            f"{train:,} training interactions per epoch",
            f"{tiers}, else {PATIENCE_LARGE}",
        ),
    ]
    return {d.key: d for d in derived}


PRESETS: dict[str, tuple[str, Callable[[Mapping[str, Any]], dict[str, Derived]]]] = {
    "auto": ("recforge.trainer.sasrec_module.SASRecModule", sasrec_auto),
}
"""Preset name -> (the LightningModule whose family it is for, the function deriving its
settings)."""


def check_preset(name: str, class_path: str) -> Callable[[Mapping[str, Any]], dict[str, Derived]]:
    """The preset's derivation function for a config training ``class_path``; a clear error for
    an unknown name or a module of another family."""
    from recforge.families import family_of_module

    if name not in PRESETS:
        raise PresetError(f"preset {name!r} is unknown; known presets: {', '.join(PRESETS)}")
    module, derive = PRESETS[name]
    wanted, given = family_of_module(module).name, family_of_module(class_path).name
    if given != wanted:
        raise PresetError(f"preset {name!r} derives {wanted} settings; this config trains {given}")
    return derive


def as_defaults(derived: Mapping[str, Derived], class_path: str) -> dict[str, Any]:
    """The derived values as parser defaults: the module's arguments nested under its
    ``class_path`` (so a config's own ``init_args`` merge over them), the others by their dotted
    key."""
    init_args: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    for key, d in derived.items():
        if key.startswith(INIT_ARGS + "."):
            *parents, leaf = key.removeprefix(INIT_ARGS + ".").split(".")
            node = init_args
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = d.value
        else:
            defaults[key] = d.value
    if init_args:
        defaults["model"] = {"class_path": class_path, "init_args": init_args}
    return defaults


def for_table_optimizer(
    derived: Mapping[str, Derived], optimizer: str | None
) -> tuple[dict[str, Derived], list[str]]:
    """``derived`` without the item-table settings whose rules do not hold for the table's
    ``optimizer`` (None: the default one), and the keys left out."""
    if optimizer is None:
        from recforge.trainer.sharding import EmbeddingOptimizerConfig

        optimizer = EmbeddingOptimizerConfig.name
    table = set().union(*TABLE_RULES_FOR.values())
    holds = set(TABLE_RULES_FOR.get(optimizer, ()))
    dropped = [key for key in derived if key in table and key not in holds]
    return {k: d for k, d in derived.items() if k not in dropped}, dropped


def resolve_preset(
    name: str,
    class_path: str,
    data_dir: str,
    synthesize: Mapping[str, Any] | None,
    optimizer: str | None,
    printing: bool = False,
) -> tuple[dict[str, Derived], list[str]] | None:
    """What preset ``name`` derives for a config training ``class_path`` on ``data_dir``, as
    ``fit`` resolves it (and ``recforge tune --enqueue-base`` with it): the settings, and the
    table keys :func:`for_table_optimizer` leaves out for ``optimizer``. Data not prepared yet:
    a ``data.synthesize`` config generates it now (as the DataModule would); under
    ``--print_config`` (``printing``) None, as the printed config stays unresolved; else a
    :class:`PresetError` saying to prepare it."""
    from recforge.data import storage
    from recforge.data.layout import MANIFEST, read_manifest
    from recforge.data.stats import with_statistics

    derive = check_preset(name, class_path)
    if not storage.exists(storage.join(data_dir, MANIFEST)):
        if printing:
            log.warning(
                "preset: %s holds no prepared dataset; the printed config is not resolved",
                data_dir,
            )
            return None
        if synthesize is None or storage.is_remote(data_dir):
            raise PresetError(
                f"preset {name!r} derives its settings from the prepared data, and {data_dir} "
                f"holds none (no {MANIFEST}): run `recforge data prepare ... --out {data_dir}` "
                "first, or pass --data.data_dir"
            )
        from recforge.data.datamodule import ensure_synthetic

        ensure_synthetic(data_dir, dict(synthesize))
    manifest = with_statistics(data_dir, read_manifest(data_dir))
    return for_table_optimizer(derive(manifest), optimizer)
