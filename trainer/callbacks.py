"""Training callbacks: throughput (samples/s, tokens/s) per epoch and on the progress bar; freed
heap memory returned to the OS after each epoch; a ``last.ckpt`` written after every
validation; early stopping whose patience can be raised on resume."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import early_stopping, model_checkpoint
from lightning.pytorch.utilities import rank_zero_info

from recforge.data import storage
from recforge.trainer import checkpoint
from recforge.trainer.host_memory import release_freed_memory, resident_bytes


class ThroughputMonitor(L.Callback):
    """Logs ``train/samples_per_sec`` and ``train/tokens_per_sec`` per epoch (summed over ranks),
    and shows samples/s on the progress bar.

    A sample is a real training example (filler rows with weight 0 do not count); a token is a
    position with a next-item target (SASRec) or a history item (two-tower).
    """

    def __init__(self, bar_every_n_steps: int = 10) -> None:
        """
        Args:
            bar_every_n_steps: how often the progress bar's samples/s is refreshed.
        """
        super().__init__()
        self.bar_every_n_steps = bar_every_n_steps
        self._start = 0.0
        self._samples = self._tokens = 0.0
        self._window_start = 0.0
        self._window_samples = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._window_start = time.perf_counter()
        self._samples = self._tokens = self._window_samples = 0.0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        samples = float(batch["weight"].sum())
        if "lengths" in batch:
            tokens = float((batch["lengths"] * batch["weight"]).sum())
        else:
            tokens = float(batch["features"]["history"].lengths().sum())
        self._samples += samples
        self._tokens += tokens
        self._window_samples += samples
        if (batch_idx + 1) % self.bar_every_n_steps == 0:
            now = time.perf_counter()
            rate = self._window_samples * trainer.world_size / max(now - self._window_start, 1e-9)
            pl_module.log("samples/s", rate, prog_bar=True, logger=False, batch_size=1)
            self._window_start, self._window_samples = now, 0.0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        totals = torch.tensor(
            [self._samples, self._tokens], dtype=torch.float64, device=pl_module.device
        )
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        pl_module.log_dict(
            {
                "train/samples_per_sec": float(totals[0]) / elapsed,
                "train/tokens_per_sec": float(totals[1]) / elapsed,
                "train/epoch_seconds": elapsed,
            },
            batch_size=1,
            sync_dist=False,
        )


class ReleaseFreedMemory(L.Callback):
    """Hands freed heap memory back to the OS when the resident size has grown by ``slack``
    bytes since the last release, after each training epoch and after each evaluation
    (:func:`~trainer.host_memory.release_freed_memory`; why: ``trainer/host_memory.py``).

    Within an epoch the holes grow too, at a rate that depends on the batch: a fixed step count
    that suits batch 32 lets batch 128 peak far higher, so the trigger is the growth itself,
    read from ``/proc/self/statm`` after each step (microseconds). The reference is the size at
    the first step after a release, once that step has faulted its working set back in: memory
    really in use raises the reference instead of triggering a release every step.
    """

    def __init__(self, slack: int = 512 << 20) -> None:
        self.slack = slack
        self._after_release: int | None = None

    def _release(self) -> None:
        release_freed_memory()
        self._after_release = None  # the next step's size is the reference

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        now = resident_bytes()
        if now is None:
            return
        if self._after_release is None:
            self._after_release = now
        elif now - self._after_release > self.slack:
            self._release()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._release()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._release()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._release()


class EarlyStopping(early_stopping.EarlyStopping):
    """Lightning's ``EarlyStopping``, except that a resumed run keeps the *configured* patience.

    Lightning restores ``patience`` from the checkpoint with the rest of the callback's state, so
    resuming a run that early stopping ended, with a larger ``patience`` to train on, stops it
    again after one more validation: the new value is silently replaced by the old. Here the
    counters (best score, validations without improvement) come from the checkpoint and the
    patience from the config, which is what an uninterrupted run with the new patience would
    have had: since resume is exact, the continued run is that run.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        configured = self.patience
        super().load_state_dict(state_dict)
        if self.patience != configured:
            rank_zero_info(
                f"EarlyStopping: patience {configured} from the config (the checkpoint had "
                f"{self.patience}); {self.wait_count} validations without improvement so far"
            )
        self.patience = configured
        exhausted = early_stopping.EarlyStoppingReason.PATIENCE_EXHAUSTED
        if self.wait_count < self.patience and self.stopping_reason == exhausted:
            self.stopping_reason = early_stopping.EarlyStoppingReason.NOT_STOPPED
            self.stopping_reason_message = None


class ModelCheckpoint(model_checkpoint.ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, except that ``save_last`` writes ``last.ckpt`` after every
    validation, and that ``dirpath`` may be an ``s3://bucket/prefix`` URI.

    Lightning 2.6 writes "last" only in a step where it also wrote a top-k checkpoint, so with
    ``monitor`` and ``save_top_k: 1`` it is written only when the metric improves: ``last.ckpt``
    is then the best epoch, and resuming a killed or early-stopped run silently redoes every
    epoch since (an ML-1M run stopped at epoch 78 had left ``last.ckpt`` at its best, epoch 68).

    On object storage a bucket that cannot be used fails ``fit`` before training, in one line
    naming the URI, rather than at the first save after an epoch of work.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.dirpath is not None:
            # Every rank checks, so all fail alike and none waits in a collective.
            checkpoint.check_directory(self.dirpath)
        super().setup(trainer, pl_module, stage)
        if self.dirpath is not None and storage.is_remote(self.dirpath):
            # Lightning's filesystem sees only the endpoint variables botocore reads; ours also
            # takes MLFLOW_S3_ENDPOINT_URL, as the checkpoint writer does.
            self._fs = storage.fsspec_filesystem(str(self.dirpath))

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        if self.dirpath is not None and storage.is_remote(self.dirpath):
            # Lightning would normalise the URI into a local path ("s3:/...") and then ask
            # fsspec for the modification time of a prefix, which object stores do not have.
            raise checkpoint.CheckpointError(
                f'ckpt_path="last" cannot search the checkpoint directory {self.dirpath}; '
                f"pass the checkpoint itself, e.g. --ckpt_path {self.dirpath}/last.ckpt"
            )
        return super()._find_last_checkpoints(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def _save_last_if_missed(self, trainer: L.Trainer) -> None:
        # Skipped when this step is already saved (a new top-k checkpoint brings "last" with it).
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
