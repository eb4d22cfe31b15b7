"""MLflow tracking (docs/architecture.md §8): where runs go, and a Lightning logger that never
stops training.

:class:`TrackingConfig` is the ``mlflow:`` section of every ``recforge fit|validate|test``
config. With no tracking URI anywhere, runs go to an embedded store that needs no server:
``sqlite:///mlflow.db`` with artifacts in ``./mlartifacts`` (MLflow 3's file store is in
maintenance mode and refuses to start, docs/architecture.md §11). An ``http(s)`` server is probed
before training starts, so a wrong URI is a one-line error rather than minutes of retries.

:class:`MLflowLogger` is Lightning's ``MLFlowLogger`` with two changes: a failing logging
call is counted and warned about instead of raised (a flaky server must not kill a training
run before its checkpoint is written), and epoch-level metrics (``val/*``, ``test/*``,
throughput) are logged with ``step = epoch`` while per-batch ones keep ``step = global step``,
so the UI's charts read naturally. MLflow refuses ``@`` in metric names, so ``ndcg@10`` is
logged as ``ndcg_at_10``. Like every Lightning logger, it talks to MLflow from rank
zero only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from recforge.data import storage

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"
EPOCH_METRIC_PREFIXES = ("val/", "test/")
EPOCH_METRIC_KEYS = frozenset(
    {"train/samples_per_sec", "train/tokens_per_sec", "train/epoch_seconds", "train/loss_epoch"}
)


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, unwritable database)."""


@dataclass
class TrackingConfig:
    """MLflow tracking of a run (docs/architecture.md §8)."""

    enabled: bool = True
    """Track the run in MLflow. ``false`` turns tracking off entirely."""
    tracking_uri: str | None = None
    """Tracking URI. ``null``: ``$MLFLOW_TRACKING_URI``, else the embedded ``sqlite:///mlflow.db``
    (artifacts in ``./mlartifacts``) in the working directory."""
    experiment_name: str | None = None
    """Experiment. ``null``: ``<model family>-<dataset directory name>``, e.g. ``sasrec-ml1m``."""
    run_name: str | None = None
    """Run name. ``null``: ``<experiment>-<command>-<UTC time>``."""
    artifact_location: str | None = None
    """Where a new experiment keeps its runs' artifacts, e.g. ``s3://bucket/mlflow`` (MLflow's S3
    artifact store: credentials from the AWS variables, a non-AWS endpoint from
    ``MLFLOW_S3_ENDPOINT_URL``). ``null``: the store's default. An existing experiment keeps its
    own location."""
    parent_run_id: str | None = None
    """Make this run a child of that MLflow run (tag ``mlflow.parentRunId``): ``recforge tune``
    nests each trial under its study's run. ``null``: a top-level run."""
    registered_model_name: str | None = None
    """After ``fit`` (and its test), export the best checkpoint to ONNX, log it with
    ``mlflow.onnx`` and register it under this name. ``null``: no export."""
    registered_model_alias: str = "champion"
    """Alias set on the new model version, so ``recforge serve models:/NAME@ALIAS`` finds it."""
    export_user_store: str = "hashed"
    """Per-user data in that export (``recforge export --user-store``): ``hashed`` (salted-hash
    keys, histories cut to what the model reads), ``none`` or ``full``."""
    fallback_to_local: bool = False
    """If the tracking server is unreachable at start: ``false`` stops with an error before
    training; ``true`` logs to the embedded local store instead, saying so."""
    system_metrics: bool = True
    """Log CPU/GPU utilisation and memory through MLflow's system-metrics monitor."""
    system_metrics_interval: float = 10.0
    """Seconds between system-metric samples."""
    probe_timeout: float = 5.0
    """Seconds to wait for an ``http(s)`` tracking server's ``/health`` at start."""

    def __post_init__(self) -> None:
        if self.system_metrics_interval <= 0:
            raise ValueError(
                f"mlflow.system_metrics_interval: must be > 0, got {self.system_metrics_interval}"
            )
        if self.export_user_store not in ("none", "hashed", "full"):
            raise ValueError(
                f"mlflow.export_user_store: {self.export_user_store!r}; expected none, hashed "
                "or full"
            )
        if self.probe_timeout <= 0:
            raise ValueError(f"mlflow.probe_timeout: must be > 0, got {self.probe_timeout}")
        if self.registered_model_name is not None and not self.registered_model_name.strip():
            raise ValueError("mlflow.registered_model_name: must be a non-empty name or null")


def local_store(db_path: str | Path) -> tuple[str, str]:
    """The sqlite URI of ``db_path`` (made absolute) and the artifact root beside it."""
    path = Path(db_path).expanduser().resolve()
    return f"sqlite:///{path}", (path.parent / DEFAULT_ARTIFACT_DIR).as_uri()


def resolve_tracking(config: TrackingConfig) -> tuple[str, str | None]:
    """The tracking URI to use and the artifact root of new experiments (``artifact_location``
    if given, else for a local sqlite store the folder beside it).

    Raises :class:`TrackingError` (or falls back to the local store when configured) if an
    ``http(s)`` server does not answer ``/health``, or a sqlite file cannot be created.
    """
    uri, artifacts = _resolve_store(config)
    if config.artifact_location is None:
        return uri, artifacts
    if storage.is_remote(config.artifact_location):
        try:
            storage.check_reachable(config.artifact_location)
        except storage.StorageError as exc:
            raise TrackingError(f"mlflow.artifact_location: {exc}") from None
    return uri, config.artifact_location


def _resolve_store(config: TrackingConfig) -> tuple[str, str | None]:
    uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    source = (
        "mlflow.tracking_uri"
        if config.tracking_uri
        else "MLFLOW_TRACKING_URI"
        if os.environ.get("MLFLOW_TRACKING_URI")
        else "the default"
    )
    if uri.startswith(("http://", "https://")):
        problem = probe_server(uri, config.probe_timeout)
        if problem is None:
            return uri, None
        if not config.fallback_to_local:
            raise TrackingError(
                f"MLflow tracking server {uri} (from {source}) is unreachable: {problem}. "
                "Start the server, fix the URI, set mlflow.fallback_to_local=true to log locally "
                "instead, or mlflow.enabled=false"
            )
        log.warning(
            "MLflow tracking server %s is unreachable (%s); logging to the local store %s instead "
            "(mlflow.fallback_to_local=true)",
            uri,
            problem,
            DEFAULT_TRACKING_URI,
        )
        uri = DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        try:
            db.expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(
                f"MLflow store {uri} (from {source}): cannot create its directory ({exc})"
            ) from None
        if not os.access(db.expanduser().resolve().parent, os.W_OK):
            raise TrackingError(
                f"MLflow store {uri} (from {source}): directory {db.parent} is not writable"
            )
        return local_store(db)
    return uri, None


def probe_server(uri: str, timeout: float) -> str | None:
    """``None`` if the MLflow server at ``uri`` answers ``GET /health``, else what went wrong."""
    import requests

    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    if response.status_code != 200:
        return f"GET /health returned HTTP {response.status_code}"
    return None


def bound_http_retries() -> None:
    """Cap MLflow's HTTP retries (default: 7 with exponential back-off, minutes per call) unless
    the user set them, so a server that disappears mid-run costs seconds per logging call."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


class MLflowLogger(MLFlowLogger):
    """Lightning's MLflow logger, failure-tolerant and with epoch-level steps (module docstring)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        run_name: str | None = None,
        artifact_location: str | None = None,
        tags: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=tracking_uri,
            artifact_location=artifact_location,
            tags=tags,
        )
        # Ours to read; Lightning keeps its copies private.
        self.tracking_uri, self.experiment_name = tracking_uri, experiment_name
        self.failures = 0
        self.config_logged = False

    def mark_model_training(self) -> None:
        """Open the experiment in the MLflow UI's model-training view: MLflow 3 guesses the
        GenAI view for an experiment without a kind. A kind someone chose is kept."""
        experiment = self.experiment.get_experiment(self.experiment_id)
        if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
            self._guard(
                "setting the experiment kind",
                self.experiment.set_experiment_tag,
                self.experiment_id,
                EXPERIMENT_KIND_TAG,
                "custom_model_development",
            )

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # any transport/server error: warn, count, keep training
            self.failures += 1
            log.warning(
                "MLflow: %s failed (%s: %s); training continues (%d logging failure(s) so far)",
                what,
                type(exc).__name__,
                str(exc)[:300],
                self.failures,
            )
            return None

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        # The CLI logs the whole resolved config (log_config); Lightning's own per-module copy
        # would repeat it under other keys, so it is only used when no config was logged.
        if self.config_logged:
            return
        self._guard("log_hyperparams", super().log_hyperparams, params)

    @rank_zero_only
    def log_config(self, flat: Mapping[str, Any], yaml_text: str) -> None:
        """The resolved config: flattened into params and whole as ``config/config.yaml``."""
        from mlflow.entities import Param

        # MLflow caps a param value at 6000 characters.
        params = [Param(key=str(k), value=str(v)[:6000]) for k, v in flat.items()]
        for start in range(0, len(params), 100):
            self._guard(
                "log params",
                self.experiment.log_batch,
                run_id=self.run_id,
                params=params[start : start + 100],
            )
        self._guard(
            "log config", self.experiment.log_text, self.run_id, yaml_text, "config/config.yaml"
        )
        self.config_logged = True

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        metrics = {mlflow_metric_name(k): v for k, v in metrics.items()}
        epoch = metrics.get("epoch")
        per_step = {k: v for k, v in metrics.items() if not _epoch_level(k)}
        per_epoch = {k: v for k, v in metrics.items() if _epoch_level(k)}
        if per_step:
            self._guard("log metrics", super().log_metrics, per_step, step)
        if per_epoch:
            self._guard(
                "log metrics",
                super().log_metrics,
                per_epoch,
                int(epoch) if epoch is not None else step,
            )

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        self._guard("finalize", super().finalize, status)
        if self.failures:
            log.warning(
                "MLflow: %d logging call(s) failed during this run; the run record is incomplete",
                self.failures,
            )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if rank_zero_only.rank != 0:
            return
        for key, value in tags.items():
            self._guard(f"set tag {key}", self.experiment.set_tag, self.run_id, key, str(value))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        if rank_zero_only.rank != 0:
            return
        self._guard(
            f"log artifact {Path(local_path).name}",
            self.experiment.log_artifact,
            self.run_id,
            str(local_path),
            artifact_path,
        )

    def log_text(self, text: str, artifact_file: str) -> None:
        if rank_zero_only.rank != 0:
            return
        self._guard(
            f"log {artifact_file}", self.experiment.log_text, self.run_id, text, artifact_file
        )


def mlflow_metric_name(key: str) -> str:
    """MLflow refuses ``@`` in metric names: ``val/ndcg@10_filtered`` ->
    ``val/ndcg_at_10_filtered``."""
    return key.replace("@", "_at_")


def _epoch_level(key: str) -> bool:
    # "epoch" itself stays per-step: its history maps global steps to epochs in the UI.
    return key.startswith(EPOCH_METRIC_PREFIXES) or key in EPOCH_METRIC_KEYS
