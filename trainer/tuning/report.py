"""Inside a ``recforge tune`` trial: report the validation metric to the study every epoch and
stop the trial when the pruner says so.

The tuner starts each trial as a plain ``recforge fit`` subprocess with ``RECFORGE_TUNE_TRIAL``
in its environment (JSON: storage URL, study name, trial id, pruner, monitored metric). An
environment variable rather than a config option, so that a trial's logged ``config.yaml`` is
a config anyone can re-run with ``recforge fit``. The pruning decision is made here, in the
trial, because only the trial sees its epochs as they end; the tuner learns the outcome from
the trial's ``pruned_at_epoch`` attribute in the study storage when the process exits.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)

ENV = "RECFORGE_TUNE_TRIAL"
PRUNED_ATTR = "pruned_at_epoch"
RUN_ATTR = "mlflow_run_id"


class TrialReporter(Callback):
    """Reports ``monitor`` to the Optuna trial after each validation (step = epoch) and asks the
    trainer to stop when ``trial.should_prune()``."""

    def __init__(
        self, storage: str, study_name: str, trial_id: int, pruner: dict, monitor: str
    ) -> None:
        self.storage, self.study_name, self.trial_id = storage, study_name, trial_id
        self.pruner, self.monitor = pruner, monitor
        self._trial: Any = None

    def _get_trial(self) -> Any:
        if self._trial is None:
            import optuna

            from recforge.trainer.tuning.optuna_setup import make_pruner, make_storage

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            # The same pruner as the tuner's: should_prune() asks the study's pruner.
            study = optuna.load_study(
                study_name=self.study_name,
                storage=make_storage(self.storage, heartbeat=False),
                pruner=make_pruner(self.pruner),
            )
            self._trial = optuna.trial.Trial(study, self.trial_id)
        return self._trial

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The tuner tags the trial's MLflow run with its outcome and attaches the trial's log.
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if hasattr(logger, "set_tags") and getattr(logger, "run_id", None):
                    self._get_trial().set_user_attr(RUN_ATTR, logger.run_id)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                log.warning("tune: %s was not logged this epoch; nothing reported", self.monitor)
            else:
                epoch = trainer.current_epoch
                trial = self._get_trial()
                trial.report(float(value), epoch)
                prune = trial.should_prune()
                if prune:
                    trial.set_user_attr(PRUNED_ATTR, epoch)
                    log.info(
                        "tune: trial pruned after epoch %d (%s %.5f)", epoch, self.monitor, value
                    )
                    for logger in trainer.loggers:
                        if hasattr(logger, "set_tags"):
                            logger.set_tags({"recforge.tune.state": "PRUNED"})
        # Every rank stops together, or the others would wait in the next epoch's collectives.
        if trainer.strategy.broadcast(prune, src=0):
            trainer.should_stop = True


def reporter_from_env() -> TrialReporter | None:
    """The reporter this process was started with by ``recforge tune``, if any."""
    raw = os.environ.get(ENV)
    if not raw:
        return None
    spec = json.loads(raw)
    return TrialReporter(
        spec["storage"], spec["study_name"], int(spec["trial_id"]), spec["pruner"], spec["monitor"]
    )
