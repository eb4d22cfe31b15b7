"""`recforge fit | validate | test`: LightningCLI over the recforge modules and DataModule.

Beyond Lightning's own sections, a config has ``mlflow:`` (:class:`recforge.trainer.tracking.logger.TrackingConfig`:
every run is tracked unless ``enabled: false``) and ``test_after_fit`` (``fit`` then tests the
best checkpoint, so the run holds its test metrics and evaluation report).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from recforge.data.datamodule import SequenceDataModule
from recforge.trainer.tracking.logger import TrackingConfig, TrackingError

log = logging.getLogger(__name__)

TRAINER_DEFAULTS: dict[str, Any] = {
    "strategy": {"class_path": "recforge.trainer.strategy.TorchRecStrategy"},
    "use_distributed_sampler": False,
}


class RecforgeCLI(LightningCLI):
    """LightningCLI with recforge's defaults: the TorchRec strategy, the SequenceDataModule, MLflow."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(TrackingConfig, "mlflow", help="MLflow tracking (DESIGN §8)")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="fit: test the best checkpoint (else the final weights) when training ends")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        self.mlflow_logger = self.recorder = None
        tracking = _as_tracking(self._get(self.config_init, "mlflow"))
        self.tracking = tracking
        if tracking.enabled:
            self._attach_mlflow(trainer, tracking)
        return trainer

    def _attach_mlflow(self, trainer: Trainer, tracking: TrackingConfig) -> None:
        from recforge.trainer.tracking.recorder import MLflowRecorder, flatten_config
        from recforge.trainer.tracking.logger import MLflowLogger, bound_http_retries, resolve_tracking

        uri, artifact_location = resolve_tracking(tracking)  # every rank: all fail alike, none hangs
        bound_http_retries()
        if not _is_rank_zero():
            # Only rank zero talks to MLflow. Not even a client on the others: under torchrun
            # every rank runs this at once, and two clients would race to create a sqlite store.
            return
        family = getattr(self.datamodule, "model_family", type(self.model).__name__)
        dataset = Path(getattr(self.datamodule, "data_dir", "data")).name
        experiment = tracking.experiment_name or f"{family}-{dataset}"
        run_name = tracking.run_name or f"{experiment}-{self.subcommand}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        logger = MLflowLogger(uri, experiment, run_name, artifact_location=artifact_location)
        try:
            run_id = logger.run_id  # creates the experiment and the run now, before any training
        except Exception as exc:
            raise TrackingError(f"MLflow store {uri}: cannot create experiment {experiment!r} or its run "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
        log.info("MLflow: run %s (%s) in experiment %r at %s", run_id, run_name, experiment, uri)
        config = self.config.get(str(self.subcommand), self.config)
        config_yaml = self._parser(self.subcommand).dump(config, skip_none=False)
        flat = flatten_config(yaml.safe_load(config_yaml) or {})
        self.recorder = MLflowRecorder(logger, str(self.subcommand), flat, config_yaml, tracking.system_metrics,
                                       tracking.system_metrics_interval)
        trainer.loggers = [*trainer.loggers, logger]
        trainer.callbacks.append(self.recorder)
        self.mlflow_logger = logger

    def after_fit(self) -> None:
        if self._get(self.config, "test_after_fit", True):
            ckpt = self.trainer.checkpoint_callback
            best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
            log.info("testing %s", best or "the final weights")
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)
        if self.mlflow_logger is not None and self.tracking.registered_model_name:
            from recforge.trainer.export.onnx_export import export_after_fit

            export_after_fit(self.trainer, self.model, self.mlflow_logger, self.tracking)
        self._finish()

    def after_validate(self) -> None:
        self._finish()

    def after_test(self) -> None:
        self._finish()

    def _finish(self) -> None:
        if self.recorder is not None:
            self.recorder.stop_system_metrics()


def _is_rank_zero() -> bool:
    """Whether this process is global rank 0, as its launcher (torchrun, or Lightning for the
    processes it starts) says in the environment; a process started by hand is rank 0."""
    import os

    return all(int(os.environ.get(name, "0") or 0) == 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _as_tracking(value: Any) -> TrackingConfig:
    if isinstance(value, TrackingConfig):
        return value
    if value is None:
        return TrackingConfig()
    items = value.as_dict() if hasattr(value, "as_dict") else dict(value)
    return TrackingConfig(**items)


def run(argv: list[str]) -> int:
    # Evaluation metrics are all-reduced by the evaluator itself, so every rank logs the same
    # value; Lightning's advice to pass sync_dist=True does not apply.
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")
    warnings.filterwarnings("ignore", message=r".*`broadcast_buffers` is deprecated.*")
    RecforgeCLI(
        model_class=None,
        datamodule_class=SequenceDataModule,
        subclass_mode_model=True,
        trainer_defaults=TRAINER_DEFAULTS,
        args=argv,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "recforge"},
    )
    return 0
