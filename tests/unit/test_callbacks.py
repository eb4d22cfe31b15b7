"""recforge.trainer.callbacks: last.ckpt after every validation, and early stopping whose patience
a resumed run can raise. Real Lightning trainers on a tiny module whose validation metric follows
a script."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from recforge.trainer.callbacks import EarlyStopping, ModelCheckpoint

# The monitored metric per epoch: best at epoch 1, never better afterwards.
SCRIPT = [0.1, 0.5, 0.4, 0.3, 0.45, 0.2, 0.1, 0.1, 0.1, 0.1]


class ScriptedMetric(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).square().mean()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("score", SCRIPT[self.current_epoch], batch_size=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2
        )

    val_dataloader = train_dataloader


def _fit(
    root: Path, patience: int, ckpt_path: str | None = None
) -> tuple[L.Trainer, ModelCheckpoint]:
    checkpoint = ModelCheckpoint(
        dirpath=root,
        monitor="score",
        mode="max",
        save_top_k=1,
        save_last=True,
        filename="best-{epoch}",
    )
    trainer = L.Trainer(
        max_epochs=len(SCRIPT),
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[checkpoint, EarlyStopping(monitor="score", mode="max", patience=patience)],
    )
    trainer.fit(ScriptedMetric(), ckpt_path=ckpt_path)
    return trainer, checkpoint


def _epoch(path: Path) -> int:
    return torch.load(path, weights_only=False)["epoch"]


def test_last_is_written_after_every_validation_and_patience_can_be_raised_on_resume(
    tmp_path: Path,
) -> None:
    # Best at epoch 1; two validations without improvement stop the run after epoch 3.
    trainer, checkpoint = _fit(tmp_path, patience=2)
    assert trainer.current_epoch == 4  # epochs 0..3 ran
    assert Path(checkpoint.best_model_path).name == "best-epoch=1.ckpt"
    # Lightning's own ModelCheckpoint leaves last.ckpt at the best epoch (1) here.
    assert _epoch(tmp_path / "last.ckpt") == 3

    # Resumed with patience 4: the counters go on from the checkpoint (2 without improvement), so
    # it stops after 2 more validations (epochs 4, 5), as an uninterrupted run with patience 4
    # would.
    # Lightning's EarlyStopping would restore patience 2 and stop again after epoch 4.
    resumed, checkpoint = _fit(tmp_path, patience=4, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.early_stopping_callback.patience == 4
    assert resumed.current_epoch == 6  # epochs 4 and 5 ran
    assert _epoch(tmp_path / "last.ckpt") == 5
    assert Path(checkpoint.best_model_path).name == "best-epoch=1.ckpt"

    uninterrupted, _ = _fit(tmp_path / "uninterrupted", patience=4)
    assert uninterrupted.current_epoch == resumed.current_epoch
