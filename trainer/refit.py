"""The final refit (``data.train_through: validation``): what it changes in a run's config, what
it refuses, and how a checkpoint says it was one (docs/architecture.md §6, "Final refit")."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_warn

from recforge.data import storage
from recforge.trainer.checkpoint import CheckpointError, read_trainer_state

log = logging.getLogger(__name__)


def validated_refit(ckpt: str, data_dir: str) -> str | None:
    """Why ``recforge validate`` must refuse ``ckpt`` on ``data_dir``, or None: a checkpoint
    trained with ``data.train_through: validation`` on that same prepared data has seen its
    validation items (on other data, say a later day's, validating it is fair). Not a readable
    recforge checkpoint: None, and Lightning's own loading says what is wrong."""
    try:
        saved = read_trainer_state(ckpt).get("datamodule_hyper_parameters") or {}
    except CheckpointError:
        return None
    if saved.get("train_through") != "validation" or not _same_dir(saved.get("data_dir"), data_dir):
        return None
    return (
        f"checkpoint {ckpt} was trained with data.train_through: validation on {data_dir}, so "
        "validating it there measures memory, not prediction; `recforge test` it instead"
    )


def _same_dir(a: Any, b: Any) -> bool:
    if not a or not b:
        return False
    if storage.is_remote(str(a)) or storage.is_remote(str(b)):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(str(a)).resolve() == Path(str(b)).resolve()


class RefitError(ValueError):
    """A ``data.train_through: validation`` run asked for something it cannot give."""


def configure_refit(config: Namespace, subcommand: str, defaults: Mapping[str, Any]) -> None:
    """A run with ``data.train_through: validation`` trains on the validation part, so a
    validation metric measures memory, not prediction: ``fit`` runs no validation loop and no
    early stopping, and keeps the last epoch's checkpoint (there is no metric to choose by);
    ``validate`` and a `recforge tune` trial are refused. These values are written into the
    run's saved ``config.yaml``. ``defaults``: the CLI's checkpoint defaults, which a refit
    replaces where the user left them."""
    why = "data.train_through: validation trains on the validation items"
    if subcommand == "validate":
        raise RefitError(
            f"{why}, so validating on them measures memory, not prediction; validate a run "
            "trained with train_through: train, or `recforge test` this one"
        )
    if subcommand != "fit":
        return
    if os.environ.get("RECFORGE_TUNE_TRIAL"):
        raise RefitError(
            f"{why}, so a `recforge tune` trial would have no held-out metric to report; tune "
            "with train_through: train, then refit the best trial's config"
        )
    epochs, steps = config.get("trainer.max_epochs"), config.get("trainer.max_steps")
    if (epochs is None or epochs < 0) and (steps is None or steps < 0):
        raise RefitError(
            f"{why} and cannot stop early: set trainer.max_epochs (the best epoch count of a "
            "run that validated) or trainer.max_steps"
        )
    top_k = config.get("checkpoint.save_top_k")
    if top_k not in (-1, 0, 1):
        raise RefitError(
            f"{why}, so no metric ranks its checkpoints: checkpoint.save_top_k must be 1 (the "
            f"last epoch), 0 or -1 (every epoch), got {top_k}"
        )
    if "val/" in str(config.get("checkpoint.filename")):
        raise RefitError(
            f"{why} and logs no val/ metric: checkpoint.filename "
            f"{config.get('checkpoint.filename')!r} names one"
        )
    monitor = config.get("checkpoint.monitor")
    if monitor not in (None, defaults["checkpoint.monitor"]):
        log.warning("data.train_through: validation: checkpoint.monitor %r dropped", monitor)
    config["trainer.limit_val_batches"] = 0
    config["trainer.num_sanity_val_steps"] = 0
    config["checkpoint.monitor"] = None
    # Without validation, Lightning saves at the end of a training epoch only when told to.
    config["checkpoint.save_on_train_epoch_end"] = True
    if config.get("checkpoint.filename") == defaults["checkpoint.filename"]:
        config["checkpoint.filename"] = "final-{epoch}"
    rank_zero_warn(
        f"{why} (each user's validation part): this fit validates nothing and does not stop "
        f"early; it trains trainer.max_epochs = {epochs} epochs (max_steps {steps}), and a "
        "decaying learning-rate schedule decays over that length. Its last epoch's checkpoint "
        "is the one kept and tested"
    )
