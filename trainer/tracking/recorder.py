"""What a recforge run records in MLflow beyond Lightning's metric stream (docs/architecture.md §8).

:class:`MLflowRecorder` is added by the CLI next to
:class:`recforge.trainer.tracking.logger.MLflowLogger`:

- at setup: tags (git commit and dirty flag, recforge/torch/torchrec/lightning versions, device
  kind and count, world size, dataset name and manifest fingerprint, command), the resolved
  config (params + YAML), the dataset manifest, and MLflow's system-metrics monitor;
- once the model is sharded: the sharding plan (text and JSON);
- after a test epoch: the evaluation report (``eval/``: table, JSON, CSV, two PNG plots);
- after fit: the best and last checkpoint paths (tags and ``checkpoints.json``).

Everything happens on rank zero; other ranks never touch MLflow. A failed logging call is a
warning (the logger's guard), never an exception that could cost a checkpoint.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch

from recforge.artifact import BEST_CHECKPOINT_TAG, LAST_CHECKPOINT_TAG
from recforge.data import storage
from recforge.trainer.tracking.logger import MLflowLogger

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]


def git_state(repo: Path = REPO) -> dict[str, str]:
    """The commit of the code that runs and whether tracked files differ from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"recforge.git.commit": "unknown"}
    return {
        "mlflow.source.git.commit": commit,
        "recforge.git.commit": commit,
        "recforge.git.dirty": str(bool(dirty)).lower(),
    }


def _location(path: str | None) -> str | None:
    """A checkpoint path as a reader elsewhere can use it: absolute, or the URI as given."""
    if not path:
        return None
    return path if storage.is_remote(path) else str(Path(path).resolve())


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


class MLflowRecorder(L.Callback):
    """Tags, config, manifest, plan, evaluation report and checkpoint references (module
    docstring)."""

    def __init__(
        self,
        logger: MLflowLogger,
        command: str,
        config_flat: Mapping[str, Any] | None = None,
        config_yaml: str | None = None,
        system_metrics: bool = True,
        system_metrics_interval: float = 10.0,
    ) -> None:
        super().__init__()
        self.logger, self.command = logger, command
        self.config_flat, self.config_yaml = config_flat, config_yaml
        self.system_metrics, self.system_metrics_interval = system_metrics, system_metrics_interval
        self._monitor: Any = None
        self._plan_logged = False
        self._set_up = False
        self.last_report: dict[str, Any] | None = None

    # --- setup / teardown ---

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        if self.system_metrics and self._monitor is None:
            self._start_system_metrics()
        if self._set_up:
            return
        self._set_up = True
        dm = trainer.datamodule
        tags: dict[str, Any] = {
            **git_state(),
            "recforge.command": self.command,
            "recforge.version": _version("recforge"),
            "torch.version": torch.__version__,
            "torchrec.version": _version("torchrec"),
            "lightning.version": _version("lightning"),
            "device.kind": _device_kind(trainer),
            "device.count": trainer.num_devices,
            "num_nodes": trainer.num_nodes,
            "world_size": trainer.world_size,
            "model.class": type(pl_module).__name__,
        }
        manifest = getattr(dm, "manifest", None)
        data_dir = getattr(dm, "data_dir", None)
        if data_dir is not None:
            tags["dataset.name"] = Path(str(data_dir).rstrip("/")).name
            tags["dataset.path"] = (
                str(data_dir) if storage.is_remote(data_dir) else str(Path(data_dir).resolve())
            )
        if isinstance(manifest, dict):
            tags["dataset.fingerprint"] = manifest.get("fingerprint", "unknown")
            tags["dataset.interactions"] = manifest.get("interactions")
            tags["dataset.items"] = manifest.get("items")
            tags["dataset.users"] = manifest.get("users")
            self.logger.log_text(json.dumps(manifest, indent=2, default=str), "data/manifest.json")
        self.logger.set_tags(tags)
        if self.config_flat is not None and self.config_yaml is not None:
            self.logger.log_config(self.config_flat, self.config_yaml)

    def _start_system_metrics(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            # A second start (the test after fit) continues the step count of the first.
            self._monitor = SystemMetricsMonitor(
                self.logger.run_id,
                sampling_interval=self.system_metrics_interval,
                tracking_uri=self.logger.tracking_uri,
                resume_logging=self._set_up,
            )
            self._monitor.start()
        except Exception as exc:  # a missing psutil or a dead server must not stop training
            log.warning("MLflow system metrics are off: %s: %s", type(exc).__name__, exc)
            self._monitor = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self.stop_system_metrics()

    def stop_system_metrics(self) -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as exc:
                log.warning("MLflow system metrics: stopping failed: %s", exc)
            self._monitor = None

    # --- plan ---

    def _log_plan(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (
            self._plan_logged
            or not trainer.is_global_zero
            or not hasattr(pl_module, "sharding_plan")
        ):
            return
        self._plan_logged = True
        plan, text = pl_module.sharding_plan()
        self.logger.log_text(text, "sharding/sharding_plan.txt")
        self.logger.log_text(json.dumps(plan, indent=2, default=str), "sharding/sharding_plan.json")
        self.logger.set_tags(
            {
                f"sharding.{table}": f"{p['sharding_type']} on ranks {p['ranks']}"
                for table, p in plan.items()
            }
        )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_plan(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_plan(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_plan(trainer, pl_module)

    # --- results ---

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        result = getattr(pl_module, "last_evaluation", None)
        if not trainer.is_global_zero or result is None:
            return
        from recforge.trainer.evaluation.report import write_report

        dm = trainer.datamodule
        title = f"{self.logger.experiment_name} test"
        with tempfile.TemporaryDirectory() as tmp:
            files = write_report(
                Path(tmp),
                result["metrics"],
                result["segments"],
                list(dm.item_counts),
                title,
                bias=result.get("bias"),
            )
            for path in files:
                self.logger.log_artifact(path, "eval")
        self.last_report = result

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        ckpt = trainer.checkpoint_callback
        refs: dict[str, Any] = {}
        if ckpt is not None:
            score = getattr(ckpt, "best_model_score", None)
            refs = {
                "best_model_path": _location(ckpt.best_model_path),
                "best_model_score": float(score) if score is not None else None,
                "monitor": getattr(ckpt, "monitor", None),
                "last_model_path": _location(ckpt.last_model_path),
            }
            self.logger.log_text(json.dumps(refs, indent=2), "checkpoints/checkpoints.json")
            tags = {
                BEST_CHECKPOINT_TAG: refs["best_model_path"],
                LAST_CHECKPOINT_TAG: refs["last_model_path"],
            }
            self.logger.set_tags({k: v for k, v in tags.items() if v})
        self.logger.set_tags(
            {"recforge.epochs": trainer.current_epoch, "recforge.global_step": trainer.global_step}
        )


def _device_kind(trainer: L.Trainer) -> str:
    device = trainer.strategy.root_device
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [{"d": 2}]}`` -> ``{"a.b": 1, "c.0.d": 2}``; ``None`` stays
    ``None``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                if isinstance(item, Mapping):
                    flat.update(flatten_config(item, f"{name}.{i}."))
                else:
                    flat[f"{name}.{i}"] = item
        else:
            flat[name] = value
    return flat
