"""What every recforge LightningModule shares: a network built on the meta device and sharded by
TorchRec in ``configure_model``, the fused embedding optimizer, the state-dict API the
:class:`~trainer.strategy.TorchRecStrategy` checkpoints through, per-step reseeding, and
full-ranking evaluation (docs/architecture.md §5, §7). Subclasses say how to build the network,
compute the training loss and score a batch against the catalog.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from recforge.families import ModelFamily, family_of_module
from recforge.trainer.evaluation.metrics import RankingEvaluator
from recforge.trainer.sharding import (
    EmbeddingOptimizerConfig,
    ShardingConfig,
    local_shards,
    memory_report,
    plan_memory,
    plan_summary,
    shard,
)

log = logging.getLogger(__name__)


@dataclass
class DenseOptimizerConfig:
    """AdamW over the dense (non-embedding) parameters, from ``configure_optimizers``."""

    lr: float = 1e-3
    """Learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam betas."""
    warmup_steps: int = 0
    """Linear warm-up steps (0 = none)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr: must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps: must be >= 0, got {self.warmup_steps}")


@dataclass
class EvalConfig:
    """Full-ranking evaluation (docs/architecture.md §7)."""

    ks: list[int] = field(default_factory=lambda: [10, 20, 100])
    """Cut-offs for HR/NDCG/coverage/popularity."""
    segments: list[int] = field(default_factory=lambda: [5, 20, 50, 200])
    """Upper bounds of history-length segments for the per-segment table."""


class ShardedRecommenderModule(L.LightningModule, ABC):
    """Base LightningModule; see the module docstring. Subclasses implement :meth:`build_model`,
    :meth:`training_loss` and :meth:`score_batch`."""

    def __init__(
        self,
        optimizer: DenseOptimizerConfig,
        embedding_optimizer: EmbeddingOptimizerConfig,
        sharding: ShardingConfig,
        evaluation: EvalConfig,
        seed: int,
    ) -> None:
        super().__init__()
        self.optim_config = optimizer
        self.embedding_optimizer, self.sharding, self.eval_config, self.seed = (
            embedding_optimizer,
            sharding,
            evaluation,
            seed,
        )
        self.net: torch.nn.Module | None = None
        self._plan: Any = None
        self._evaluator: RankingEvaluator | None = None
        self.last_evaluation: dict[str, Any] | None = None
        """Metrics and segment table of the last test epoch (for reports)."""

    # --- what the data is linked from (LightningCLI ``link_arguments``, applied on instantiation)

    @property
    def family(self) -> ModelFamily:
        """This module's entry in :mod:`recforge.families`."""
        cls = type(self)
        return family_of_module(f"{cls.__module__}.{cls.__qualname__}")

    @property
    def batch_format(self) -> str:
        """The DataModule batch format this model reads."""
        return self.family.batch_format

    @property
    @abstractmethod
    def max_len(self) -> int:
        """Sequence length L of ``sequence`` batches (linked to ``data.max_len``)."""

    @property
    @abstractmethod
    def history_len(self) -> int:
        """History length H of ``history`` batches (linked to ``data.history_len``)."""

    # --- what a model family provides ---

    @abstractmethod
    def build_model(self, datamodule: Any) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        """The unsharded network (embedding tables on ``meta``) and its table parameters."""

    @abstractmethod
    def training_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's loss, computed through ``self.net`` (so DDP syncs dense gradients)."""

    @abstractmethod
    def score_batch(self, batch: dict[str, Any]) -> torch.Tensor:
        """Scores (B, N + 1) of every item for each evaluation example; column 0 is padding."""

    def prepare_evaluation(self) -> None:
        """Called on every rank at the start of each validation/test epoch, in eval mode and without
        gradients, before any :meth:`score_batch` (e.g. to embed the catalogue once per epoch).
        Lookups in sharded tables are collectives: every rank must make the same calls. No-op
        here."""

    def finish_evaluation(self) -> None:
        """Called on every rank at the end of each validation/test epoch (release what
        :meth:`prepare_evaluation` made). No-op here."""

    # --- building ---

    def configure_model(self) -> None:
        if self.net is not None:
            return
        device = self.trainer.strategy.root_device
        dm = self.trainer.datamodule
        if getattr(dm, "batch_format", self.batch_format) != self.batch_format:
            # Only reachable when the module and data are built by hand: the CLI links them.
            raise ValueError(
                f"data.batch_format={dm.batch_format!r}: {type(self).__name__} reads "
                f"{self.batch_format!r} batches"
            )
        model, tables = self.build_model(dm)
        self.embedding_optimizer.apply(tables, device)
        # Tables on the meta device: DMP allocates only this rank's shards.
        self.net, self._plan = shard(model, self.sharding, device, self.trainer.num_devices)

    @property
    def model(self) -> torch.nn.Module:
        """The unwrapped network (its sharded tables stay sharded)."""
        assert self.net is not None, "configure_model has not run"
        return self.net.module

    @property
    def fused_optimizer(self) -> Any:
        return getattr(self.net, "fused_optimizer", None)

    def sharding_plan(self) -> tuple[dict[str, Any], str]:
        return plan_summary(self._plan), str(self._plan)

    def sharded_state_dict(self) -> dict[str, Any]:
        return self.net.state_dict()

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state)

    def configure_optimizers(self) -> Any:
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        dense = [
            p
            for _, p in in_backward_optimizer_filter(self.net.named_parameters())
            if p.requires_grad
        ]
        cfg = self.optim_config
        opt = torch.optim.AdamW(
            dense, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay
        )
        if cfg.warmup_steps == 0:
            return opt
        warmup = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: min(1.0, (step + 1) / cfg.warmup_steps)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    # --- hooks ---

    def on_fit_start(self) -> None:
        self._write_plan()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Reseed per (seed, epoch, batch, rank): dropout masks and sampled negatives then do not
        # depend on how many random draws happened before (DataLoader iterators, validation,
        # a resume), so a resumed run continues exactly like an uninterrupted one.
        torch.manual_seed(
            hash((self.seed, self.current_epoch, batch_idx, self.global_rank)) & (2**63 - 1)
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["weight"].shape[0]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._evaluator = self._new_evaluator()
        self.prepare_evaluation()

    def on_test_epoch_start(self) -> None:
        self._evaluator = self._new_evaluator()
        self.prepare_evaluation()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self.finish_evaluation()
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self.finish_evaluation()
        metrics = self._log_eval("test")
        out = self._out_dir()  # a collective (broadcast): every rank asks
        self.last_evaluation = {"metrics": metrics, "segments": self._evaluator.segment_table()}
        if self.global_rank == 0:
            _write_json(out / "test_metrics.json", self.last_evaluation)

    # --- helpers ---

    def _new_evaluator(self) -> RankingEvaluator:
        dm = self.trainer.datamodule
        return RankingEvaluator(
            num_items=dm.num_items,
            item_popularity=torch.as_tensor(dm.item_counts),
            ks=tuple(self.eval_config.ks),
            segments=tuple(self.eval_config.segments),
            device=self.device,
        )

    def _eval_step(self, batch: dict[str, Any]) -> None:
        scores = self.score_batch(batch)  # (B, N + 1)
        self._evaluator.update(
            scores.float(),
            batch["target"],
            batch["seen_values"],
            batch["seen_lengths"],
            batch["weight"],
        )

    def _log_eval(self, prefix: str) -> dict[str, float]:
        metrics = self._evaluator.compute()  # all-reduced: identical on every rank
        flat = {
            f"{prefix}/{k}": float(v) for k, v in metrics.items() if not k.startswith("segment/")
        }
        self.log_dict(flat, sync_dist=False, rank_zero_only=False)
        return metrics

    def _out_dir(self) -> Path:
        """The run's log directory. ``trainer.log_dir`` broadcasts from rank 0: call it on every
        rank."""
        out = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        return out

    def _write_plan(self) -> None:
        plan, text = self.sharding_plan()
        shards = local_shards(self.net.state_dict())
        out = self._out_dir()
        # Each rank records the rows it holds: the evidence that tables are really split.
        (out / f"local_shards_rank{self.global_rank}.json").write_text(json.dumps(shards, indent=2))
        if self.global_rank == 0:
            memory = {t: {str(r): n for r, n in m.items()} for t, m in plan_memory(plan).items()}
            _write_json(
                out / "sharding_plan.json",
                {t: {**entry, "bytes_per_rank": memory[t]} for t, entry in plan.items()},
            )
            report = memory_report(plan)
            (out / "sharding_plan.txt").write_text(f"{report}\n\n{text}")
            log.info("sharding plan (fp32 weight bytes per rank):\n%s", report)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)
