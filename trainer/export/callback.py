"""Export and registration once ``recforge fit`` is done, as a Lightning callback.

The CLI adds it to the trainer and calls :meth:`ExportAndRegister.after_fit_and_test` when fit
and its test have finished; training code never imports it (export sits above training).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from recforge.data import storage
from recforge.trainer.export.onnx_export import export
from recforge.trainer.tracking.registry import log_and_register

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
"""The artifact directory after fit, beside the run's ``checkpoints`` folder."""


class ExportAndRegister(Callback):
    """With ``mlflow.registered_model_name``: export the best checkpoint, log it to the run and
    register it under that name (and alias)."""

    def after_fit_and_test(self, trainer: Any, module: Any, logger: Any, tracking: Any) -> None:
        """Rank zero only, and without collectives (the checkpoint is read with ``no_dist``), so
        the other ranks may already be gone. A failure is logged, never raised: training is over
        and its checkpoints are on disk. Nothing happens without a registered model name or an
        MLflow logger."""
        if (
            logger is None
            or tracking is None
            or not tracking.registered_model_name
            or trainer.global_rank != 0
        ):
            return
        ckpt = trainer.checkpoint_callback
        path = (ckpt.best_model_path or ckpt.last_model_path) if ckpt is not None else ""
        if not path:
            log.warning("MLflow: no checkpoint was saved, so nothing is exported or registered")
            return
        # Beside the checkpoints' run folder; with checkpoints on object storage, in the run's
        # local log folder (the artifact is staged here, then logged to MLflow's store).
        out = (
            Path(trainer.log_dir or trainer.default_root_dir) / EXPORT_DIR
            if storage.is_remote(path)
            else Path(path).parent.parent / EXPORT_DIR
        )
        evaluation = getattr(module, "last_evaluation", None) or {}
        metrics = {
            f"test/{k}": v
            for k, v in evaluation.get("metrics", {}).items()
            if not k.startswith("segment/")
        }
        try:
            export(
                path,
                out,
                run_id=logger.run_id,
                metrics=metrics,
                overwrite=True,
                user_store=getattr(tracking, "export_user_store", "hashed"),
            )
            log_and_register(
                out,
                logger.tracking_uri,
                logger.run_id,
                tracking.registered_model_name,
                tracking.registered_model_alias,
            )
        except Exception as exc:
            log.error(
                "export/registration after fit failed (%s: %s); the checkpoint %s is "
                "intact, rerun `recforge export --checkpoint %s --register %s`",
                type(exc).__name__,
                exc,
                path,
                path,
                tracking.registered_model_name,
            )
