"""Training callbacks: throughput (samples/s, tokens/s) per epoch and on the progress bar."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


class ThroughputMonitor(L.Callback):
    """Logs ``train/samples_per_sec`` and ``train/tokens_per_sec`` per epoch (summed over ranks), and
    shows samples/s on the progress bar.

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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
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
        totals = torch.tensor([self._samples, self._tokens], dtype=torch.float64, device=pl_module.device)
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        pl_module.log_dict({"train/samples_per_sec": float(totals[0]) / elapsed,
                            "train/tokens_per_sec": float(totals[1]) / elapsed,
                            "train/epoch_seconds": elapsed}, batch_size=1, sync_dist=False)
