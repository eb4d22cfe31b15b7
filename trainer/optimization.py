"""The dense optimizer and the learning-rate schedule shared by the dense and embedding parts.

Dense parameters are trained by AdamW (``configure_optimizers``); the item table by an optimizer
fused into its backward pass (:class:`~trainer.sharding.EmbeddingOptimizerConfig`), which
Lightning never steps. One schedule multiplies both learning rates, so that a decayed run
decays everywhere: ``factor(step)`` is a linear warm-up to 1 over ``warmup_steps``, then

- ``constant``: 1;
- ``cosine``: ``r + (1 - r) * (1 + cos(pi * p)) / 2``;
- ``linear``: ``r + (1 - r) * (1 - p)``,

where ``p`` is the fraction of the post-warm-up steps done and ``r`` is ``min_lr_ratio``.
Decays end at the run's last planned step (``trainer.max_epochs`` x batches per epoch, or
``trainer.max_steps``): a decaying run needs a planned length, so a run bounded only by
``trainer.max_time`` is refused with that message. A short time budget is where decay pays
most: the last epochs at a small rate settle the model (``configs/sasrec/ml1m_fast.yaml``).

The embedding rate is pushed into the fused kernels before every step
(:func:`set_embedding_lr`); TorchRec's fused optimizers copy ``param_groups[0]["lr"]`` into
the kernel on ``zero_grad``/``step``, which are otherwise never called with in-backward
updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

ScheduleKind = Literal["constant", "cosine", "linear"]
SCHEDULES: tuple[ScheduleKind, ...] = ("constant", "cosine", "linear")


@dataclass
class DenseOptimizerConfig:
    """AdamW over the dense (non-embedding) parameters, and the learning-rate schedule."""

    lr: float = 1e-3
    """Learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam betas."""
    warmup_steps: int = 0
    """Linear warm-up steps (0 = none)."""
    schedule: ScheduleKind = "constant"
    """After warm-up: ``constant``, ``cosine`` or ``linear`` decay to ``min_lr_ratio`` x lr at
    the last planned step (needs ``trainer.max_epochs`` or ``trainer.max_steps``)."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the initial one (decaying schedules)."""
    schedule_embeddings: bool = True
    """Apply the same schedule to the item table's fused optimizer."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr: must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"optimizer.schedule: {self.schedule!r}; expected one of {', '.join(SCHEDULES)}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optimizer.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")

    @property
    def scheduled(self) -> bool:
        """Whether the rate ever differs from ``lr``."""
        return self.warmup_steps > 0 or self.schedule != "constant"


def lr_factor(cfg: DenseOptimizerConfig, step: int, total_steps: float) -> float:
    """The schedule's multiplier of the base rates at optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(total_steps - cfg.warmup_steps, 1)
    done = min(max((step - cfg.warmup_steps) / span, 0.0), 1.0)
    r = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * done))
    return r + (1.0 - r) * (1.0 - done)


def planned_steps(cfg: DenseOptimizerConfig, estimated_stepping_batches: float) -> float:
    """The step at which decay ends; refuses a decaying schedule without a planned length."""
    if cfg.schedule != "constant" and not math.isfinite(estimated_stepping_batches):
        raise ValueError(
            f"optimizer.schedule={cfg.schedule!r} decays to the last planned step, but the run "
            "has no planned length: set trainer.max_epochs or trainer.max_steps "
            "(trainer.max_time alone can stop a run, not plan one)"
        )
    return estimated_stepping_batches


def configure_dense(
    parameters: list[torch.nn.Parameter], cfg: DenseOptimizerConfig, total_steps: float
) -> Any:
    """AdamW with the schedule as a per-step ``LambdaLR`` (Lightning's optimizer config)."""
    opt = torch.optim.AdamW(
        parameters, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
    )
    if not cfg.scheduled:
        return opt
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(cfg, step, total_steps)
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def set_embedding_lr(fused_optimizer: Any, lr: float) -> None:
    """Set the fused embedding optimizer's rate for the coming steps (every kernel)."""
    for group in fused_optimizer.param_groups:
        group["lr"] = lr
    # Each TorchRec fused optimizer copies param_groups[0]["lr"] into its kernel here.
    fused_optimizer.zero_grad()
