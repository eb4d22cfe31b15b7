"""`recforge fit | validate | test`: LightningCLI over the recforge modules and DataModule.

Beyond Lightning's own sections, a config has ``mlflow:``
(:class:`recforge.trainer.tracking.logger.TrackingConfig`: every run is tracked unless
``enabled: false``) and ``test_after_fit`` (``fit`` then tests the best checkpoint, so the run
holds its test metrics and evaluation report).

Each value is set once. What every run wants is a default here rather than a block repeated in
every YAML: the CSV logger, and the callbacks as their own sections (``checkpoint:``,
``early_stopping:``, ``throughput:``) that a config overrides field by field. Values two
components share are linked: ``seed_everything`` seeds the model's per-step RNG and the data's
shuffle, and the data's batch format, ``max_len`` and ``history_len`` come from the model.
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import early_stopping
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from recforge.data.datamodule import SequenceDataModule
from recforge.trainer.callbacks import (
    EarlyStopping,
    ModelCheckpoint,
    ReleaseFreedMemory,
    ThroughputMonitor,
)
from recforge.trainer.presets import Derived
from recforge.trainer.refit import RefitError, configure_refit, validated_refit
from recforge.trainer.tracking.logger import TrackingConfig, TrackingError

log = logging.getLogger(__name__)

MONITOR = "val/ndcg@10_filtered"

TRAINER_DEFAULTS: dict[str, Any] = {
    "strategy": {"class_path": "recforge.trainer.strategy.TorchRecStrategy"},
    "use_distributed_sampler": False,
    # A config names its run directory: trainer.logger.init_args.name (e.g. sasrec-tiny) gives
    # runs/sasrec-tiny/version_N/ with metrics.csv and checkpoints/.
    "logger": {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": "runs"},
    },
}

CALLBACK_DEFAULTS: dict[str, Any] = {
    "checkpoint.monitor": MONITOR,
    "checkpoint.mode": "max",
    "checkpoint.save_top_k": 1,
    "checkpoint.save_last": True,
    "checkpoint.filename": "best-{epoch}",
    "early_stopping.monitor": MONITOR,
    "early_stopping.mode": "max",
    "early_stopping.patience": 5,
}

DATA_LINKS = ("batch_format", "max_len", "history_len")
"""DataModule arguments taken from the instantiated model (its family and window lengths)."""


class RecforgeCLI(LightningCLI):
    """LightningCLI with recforge's defaults: the TorchRec strategy, the SequenceDataModule,
    MLflow."""

    post_fit_callbacks: tuple[type[Callback], ...] = ()
    """Callbacks added to every trainer that also act once ``fit`` and its test are done, through
    ``after_fit_and_test(trainer, module, mlflow_logger, tracking)``. The app sets them (export and
    registration live above training, which must not import them)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(
            TrackingConfig, "mlflow", help="MLflow tracking (docs/architecture.md §8)"
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="fit: test the best checkpoint (else the final weights) when training ends",
        )
        parser.add_argument(
            "--reset_embedding_optimizer",
            type=bool,
            default=False,
            help="fit --ckpt_path: load the weights only and start the fused embedding optimizer "
            "afresh, e.g. to resume under a sharding plan whose optimizer state cannot be carried "
            "over (a changed sharding type); a world-size change alone needs no reset",
        )
        parser.add_argument(
            "--init_from",
            type=str | None,
            default=None,
            help="fit: warm start. A NEW run (epoch 0, fresh optimizers) whose weights come from "
            "this checkpoint, on data that may have more users/items: prepare it with `recforge "
            "data prepare --vocab-from <the checkpoint's data>`. Known rows are copied, new rows "
            "keep their initialisation; any plan/world size (docs/architecture.md §6). Not with "
            "--ckpt_path, which resumes a run",
        )
        parser.add_argument(
            "--preset",
            type=str | None,
            default=None,
            help="derive the settings a config leaves unset from the data's manifest: `auto` "
            "(SASRec: max_len, num_layers, dropout, the item table's learning rate and weight "
            "decay, early_stopping.patience; explicit values win; docs/architecture.md §6)",
        )
        parser.add_lightning_class_args(ThroughputMonitor, "throughput")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults(CALLBACK_DEFAULTS)
        parser.link_arguments("seed_everything", "model.init_args.seed")
        parser.link_arguments("seed_everything", "data.seed")
        for name in DATA_LINKS:
            parser.link_arguments(f"model.{name}", f"data.{name}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """With ``preset:`` set, parse twice: once to read the preset and the data directory,
        then again with the derived values as defaults, so what a config or the command line
        sets explicitly still wins (and ``--print_config`` shows the resolved values)."""
        if not isinstance(args, list):
            super().parse_arguments(parser, args)
            return
        first = _without_print_config(args)
        printing = len(first) < len(args)
        exit_on_error, parser.exit_on_error = parser.exit_on_error, False
        try:
            super().parse_arguments(parser, first)
        except ArgumentError:
            # Reported (or, under --print_config, printed regardless) by the full parse.
            parser.exit_on_error = exit_on_error
            super().parse_arguments(parser, args)
            return
        finally:
            parser.exit_on_error = exit_on_error
        derived = self._apply_preset(printing)
        if derived or printing:
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        for d in derived.values():
            value = self.config[subcommand].get(d.key)
            if value == d.value:
                log.info("preset: %s", d.describe())
            else:
                log.info(
                    "preset: %s = %s, set explicitly (the preset derives %s from %s)",
                    d.key,
                    value,
                    d.value,
                    d.statistic,
                )

    def _apply_preset(self, printing: bool) -> dict[str, Derived]:
        """Set the subcommand parser's defaults to the preset's values; {} without a preset (or
        under ``--print_config`` with no prepared data to derive them from)."""
        from recforge.families import UnknownFamilyError
        from recforge.trainer.presets import (
            TABLE_OPTIMIZER,
            TABLE_RULES_FOR,
            PresetError,
            as_defaults,
            resolve_preset,
        )

        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        name = config.get("preset") if config is not None else None
        if name is None:
            return {}
        parser = self._subcommand_parsers[subcommand]
        class_path = str(config.get("model.class_path"))
        optimizer = config.get(TABLE_OPTIMIZER)
        try:
            resolved = resolve_preset(
                name,
                class_path,
                str(config.get("data.data_dir")),
                config.get("data.synthesize"),
                optimizer,
                printing,
            )
        except PresetError as exc:
            parser.error(str(exc))
        except UnknownFamilyError as exc:
            parser.error(f"preset {name!r}: {exc}")
        if resolved is None:
            return {}
        derived, dropped = resolved
        for key in dropped:
            log.info(
                "preset: %s not derived: its rule is for %s, and the item table's optimizer is %s",
                key,
                " or ".join(k for k, keys in TABLE_RULES_FOR.items() if key in keys),
                optimizer,
            )
        parser.set_defaults(as_defaults(derived, class_path))
        return derived

    def before_instantiate_classes(self) -> None:
        if self.subcommand in ("validate", "test", "predict"):
            loggers = self.config[self.subcommand].trainer.logger
            for logger in loggers if isinstance(loggers, list) else [loggers]:
                _beside_existing_run(logger, str(self.subcommand))
        if self._refits():
            subcommand = str(self.subcommand)
            try:
                configure_refit(self.config[subcommand], subcommand, CALLBACK_DEFAULTS)
            except RefitError as exc:
                self._subcommand_parsers[subcommand].error(str(exc))
        elif self.subcommand == "validate" and self.config.validate.get("ckpt_path"):
            validate = self.config.validate
            why = validated_refit(validate.ckpt_path, validate.get("data.data_dir"))
            if why:
                self._subcommand_parsers["validate"].error(why)

    def _refits(self) -> bool:
        """Whether this run trains on the validation items too (``data.train_through``)."""
        config = self.config.get(str(self.subcommand)) if self.subcommand else self.config
        return config is not None and config.get("data.train_through") == "validation"

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if self._refits():
            # Early stopping would wait for a validation metric that no epoch logs.
            trainer.callbacks = [
                c for c in trainer.callbacks if not isinstance(c, early_stopping.EarlyStopping)
            ]
        trainer.callbacks.extend(cls() for cls in self.post_fit_callbacks)
        trainer.callbacks.append(ReleaseFreedMemory())
        if os.environ.get("RECFORGE_TUNE_TRIAL"):
            # A `recforge tune` trial: report the metric per epoch and stop when pruned.
            from recforge.trainer.tuning.report import reporter_from_env

            trainer.callbacks.append(reporter_from_env())
        if self._get(self.config_init, "reset_embedding_optimizer", False):
            if not hasattr(trainer.strategy, "reset_embedding_optimizer"):
                raise ValueError(
                    "--reset_embedding_optimizer needs recforge's TorchRecStrategy, not "
                    f"{type(trainer.strategy).__name__}"
                )
            trainer.strategy.reset_embedding_optimizer = True
        self.mlflow_logger = self.recorder = None
        tracking = _as_tracking(self._get(self.config_init, "mlflow"))
        self.tracking = tracking
        if tracking.enabled:
            self._attach_mlflow(trainer, tracking)
        return trainer

    def _attach_mlflow(self, trainer: Trainer, tracking: TrackingConfig) -> None:
        from recforge.trainer.tracking.logger import (
            MLflowLogger,
            bound_http_retries,
            resolve_tracking,
        )
        from recforge.trainer.tracking.recorder import MLflowRecorder, flatten_config

        uri, artifact_location = resolve_tracking(
            tracking
        )  # every rank: all fail alike, none hangs
        bound_http_retries()
        if not _is_rank_zero():
            # Only rank zero talks to MLflow. Not even a client on the others: under torchrun
            # every rank runs this at once, and two clients would race to create a sqlite store.
            return
        family = self.model.family.name
        dataset = Path(getattr(self.datamodule, "data_dir", "data")).name
        experiment = tracking.experiment_name or f"{family}-{dataset}"
        run_name = (
            tracking.run_name
            or f"{experiment}-{self.subcommand}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        )
        tags = {"mlflow.parentRunId": tracking.parent_run_id} if tracking.parent_run_id else None
        logger = MLflowLogger(
            uri, experiment, run_name, artifact_location=artifact_location, tags=tags
        )
        try:
            run_id = logger.run_id  # creates the experiment and the run now, before any training
        except Exception as exc:
            raise TrackingError(
                f"MLflow store {uri}: cannot create experiment {experiment!r} or its run "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})"
            ) from None
        log.info("MLflow: run %s (%s) in experiment %r at %s", run_id, run_name, experiment, uri)
        logger.mark_model_training()
        config = self.config.get(str(self.subcommand), self.config)
        config_yaml = self._parser(self.subcommand).dump(config, skip_none=False)
        flat = flatten_config(yaml.safe_load(config_yaml) or {})
        self.recorder = MLflowRecorder(
            logger,
            str(self.subcommand),
            flat,
            config_yaml,
            tracking.system_metrics,
            tracking.system_metrics_interval,
        )
        trainer.loggers = [*trainer.loggers, logger]
        trainer.callbacks.append(self.recorder)
        self.mlflow_logger = logger

    def before_fit(self) -> None:
        from recforge.data.erasure import check_current

        # Before anything is built: a dataset missing an erasure of its ledger is refused.
        check_current(str(self.datamodule.data_dir), self.datamodule.manifest)
        self._resume_after_restart()
        init_from = self._get(self.config, "init_from")
        if init_from:
            from recforge.trainer.checkpoint import CheckpointError

            if self._get(self.config, "ckpt_path"):
                raise CheckpointError(
                    "--init_from starts a new run from a checkpoint's weights and --ckpt_path "
                    "resumes a run: pass one of them"
                )
            if not hasattr(self.model, "init_from"):
                raise ValueError(f"--init_from: {type(self.model).__name__} cannot warm start")
            self.model.init_from = str(init_from)

    def _resume_after_restart(self) -> None:
        """Under ``torchrun --max-restarts N`` a restarted attempt (``TORCHELASTIC_RESTART_COUNT``
        > 0) resumes from ``<checkpoint.dirpath>/last.ckpt``, the last checkpoint of the run.

        The directory must be given: by default checkpoints live in the logger's run directory,
        and a restarted attempt's logger starts a new ``version_N+1`` that holds none. So with
        restarts allowed a ``fit`` without ``--checkpoint.dirpath`` is refused on its first
        attempt, before any training."""
        max_restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if max_restarts <= 0 and restart <= 0:
            return
        from recforge.data import storage
        from recforge.trainer.checkpoint import CheckpointError

        callback = self.trainer.checkpoint_callback
        dirpath = getattr(callback, "dirpath", None)
        if dirpath is None:
            raise CheckpointError(
                f"torchrun --max-restarts {max_restarts}: a restarted attempt resumes from the "
                "last checkpoint of the run, so pass --checkpoint.dirpath DIR (one directory "
                "every attempt shares; the logger's run directory changes with each attempt)"
            )
        if restart <= 0:
            return
        last = storage.join(str(dirpath), "last.ckpt")
        if not storage.exists(last):
            log.info(
                "torchrun restart %d: no checkpoint in %s yet, training from the start",
                restart,
                dirpath,
            )
            return
        log.info(
            "torchrun restart %d: resuming from %s (the last checkpoint of this run)", restart, last
        )
        for namespace in (self.config, self.config_init):
            config = namespace[str(self.subcommand)]
            config["ckpt_path"] = last
            config["init_from"] = None  # the checkpoint holds a warm-started run's own state

    def after_fit(self) -> None:
        if self._get(self.config, "test_after_fit", True):
            ckpt = self.trainer.checkpoint_callback
            best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
            log.info("testing %s", best or "the final weights")
            self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)
        for callback in self.trainer.callbacks:
            hook = getattr(callback, "after_fit_and_test", None)
            if hook is not None:
                hook(self.trainer, self.model, self.mlflow_logger, self.tracking)
        self._finish()

    def after_validate(self) -> None:
        self._finish()

    def after_test(self) -> None:
        self._finish()

    def _finish(self) -> None:
        if self.recorder is not None:
            self.recorder.stop_system_metrics()


def _beside_existing_run(logger: Any, subcommand: str) -> None:
    """Point a CSV logger whose fixed ``version`` names a run directory that already holds a
    ``metrics.csv`` (a `recforge tune` trial's config.yaml, or any config with a version set) at
    ``<version>-<subcommand>[-N]`` beside it (a version that already ends so is numbered on, not
    nested): Lightning's CSV logger deletes the metrics.csv it finds, so
    `recforge test --config trial-9/config.yaml` would erase the trial's curve."""
    if not isinstance(logger, Namespace) or not str(logger.get("class_path", "")).endswith(
        "CSVLogger"
    ):
        return
    args = logger.get("init_args") or Namespace()
    version = args.get("version")
    if version is None:  # Lightning picks a new version_N
        return
    from recforge.data import storage

    version = f"version_{version}" if isinstance(version, int) else str(version)
    name = args.get("name")
    parent = storage.join(args.get("save_dir") or ".", *([name] if name else []))
    if not storage.exists(storage.join(parent, version, "metrics.csv")):
        return
    # A config saved by an earlier test beside the run already names `<run>-test[-N]`: number
    # the next one after it rather than nesting `<run>-test-test`. Only when `<run>` is a run
    # there: a version the user named `ablation-test` keeps its name.
    base = re.sub(rf"-{re.escape(subcommand)}(-\d+)?$", "", version)
    if base != version and not storage.exists(storage.join(parent, base, "metrics.csv")):
        base = version
    moved, n = f"{base}-{subcommand}", 1
    while storage.exists(storage.join(parent, moved)):
        n += 1
        moved = f"{base}-{subcommand}-{n}"
    log.info(
        "%s holds a run's metrics.csv; this %s logs to %s beside it",
        storage.join(parent, version),
        subcommand,
        storage.join(parent, moved),
    )
    args.version = moved


def _without_print_config(args: list[str]) -> list[str]:
    """``args`` less ``--print_config`` (and its flags: ``--print_config=skip_null`` or
    ``--print_config skip_null``)."""
    kept: list[str] = []
    skip_flags = False
    for arg in args:
        if arg == "--print_config" or arg.startswith("--print_config="):
            skip_flags = arg == "--print_config"
            continue
        if skip_flags and set(arg.split(",")) <= {"skip_null", "skip_default", "comments"}:
            skip_flags = False
            continue
        skip_flags = False
        kept.append(arg)
    return kept


def _is_rank_zero() -> bool:
    """Whether this process is global rank 0, as its launcher (torchrun, or Lightning for the
    processes it starts) says in the environment; a process started by hand is rank 0."""
    import os

    return all(
        int(os.environ.get(name, "0") or 0) == 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK")
    )


def _as_tracking(value: Any) -> TrackingConfig:
    if isinstance(value, TrackingConfig):
        return value
    if value is None:
        return TrackingConfig()
    items = value.as_dict() if hasattr(value, "as_dict") else dict(value)
    return TrackingConfig(**items)


def run(argv: list[str], post_fit_callbacks: tuple[type[Callback], ...] = ()) -> int:
    # Evaluation metrics are all-reduced by the evaluator itself, so every rank logs the same
    # value; Lightning's advice to pass sync_dist=True does not apply.
    warnings.filterwarnings(
        "ignore", message=r".*when logging on epoch level in distributed setting.*"
    )
    warnings.filterwarnings("ignore", message=r".*`broadcast_buffers` is deprecated.*")
    # Config fields are documented by attribute docstrings (the string under each dataclass
    # field), which jsonargparse reads only when asked to. Reading them adds about two seconds to
    # every start, so only a help request (--help, --model.help CLASS) pays for it.
    if any(
        a in ("-h", "--help") or (a[:2] == "--" and a.split("=")[0].endswith(".help")) for a in argv
    ):
        set_parsing_settings(docstring_parse_attribute_docstrings=True)
    cli_class = type("RecforgeCLI", (RecforgeCLI,), {"post_fit_callbacks": post_fit_callbacks})
    cli_class(
        model_class=None,
        datamodule_class=SequenceDataModule,
        subclass_mode_model=True,
        trainer_defaults=TRAINER_DEFAULTS,
        args=argv,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "recforge"},
    )
    return 0
