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
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist

from recforge.families import ModelFamily, family_of_module
from recforge.trainer.evaluation.bias import BiasAccumulator, from_data
from recforge.trainer.evaluation.metrics import RankingEvaluator
from recforge.trainer.optimization import DenseOptimizerConfig as DenseOptimizerConfig
from recforge.trainer.optimization import (
    configure_dense,
    lr_factor,
    planned_steps,
    set_embedding_lr,
)
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
class EvalConfig:
    """Full-ranking evaluation (docs/architecture.md §7)."""

    ks: list[int] = field(default_factory=lambda: [10, 20, 100])
    """Cut-offs for HR/NDCG/coverage/popularity."""
    segments: list[int] = field(default_factory=lambda: [5, 20, 50, 200])
    """Upper bounds of history-length segments for the per-segment table."""
    item_chunk: int = 65536
    """Items scored at a time: a rank never holds more than ``B x item_chunk`` scores (plus
    ``B x max(ks)`` top-K keys). A catalogue of at most this many items, evaluated without
    ``shard_items``, is scored as one ``(B, N + 1)`` matrix by the family's ``score_batch``."""
    shard_items: bool | Literal["auto"] = "auto"
    """Item-sharded evaluation over ranks: each rank scores every rank's users (all-gathered
    user vectors) against its own item rows, and the per-user counts and top-K lists are
    combined exactly. ``auto``: when the item table is sharded row-wise over all ranks;
    ``true``: whenever there are several ranks (rows split evenly if the table is not row-wise);
    ``false``: each rank scores the whole catalogue for its own users."""
    group_by: list[str] = field(default_factory=list)
    """Categorical user features to report HR/NDCG@K (smallest K, filtered) per value of, with
    the max/min ratio between values (the bias report, docs/architecture.md §7)."""
    category: str | None = "auto"
    """Item feature whose values are the categories of intra-list diversity and calibration;
    ``auto``: the categorical/list item feature with the fewest values; ``null`` (or no such
    feature): diversity by item embeddings and no calibration."""
    calibration_alpha: float = 0.01
    """Smoothing of the recommended category distribution in calibration KL."""

    def __post_init__(self) -> None:
        if self.item_chunk < 1:
            raise ValueError(f"evaluation.item_chunk: must be >= 1, got {self.item_chunk}")
        if self.shard_items not in (True, False, "auto"):
            raise ValueError(
                f"evaluation.shard_items: true, false or auto, got {self.shard_items!r}"
            )


@dataclass
class _ItemScoring:
    """The item rows ``lo..hi - 1`` this rank scores in an evaluation epoch, and their vectors."""

    lo: int
    hi: int
    vectors: torch.Tensor  # (hi - lo, D)
    sharded: bool


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
        self._bias: BiasAccumulator | None = None
        self._item_scoring: _ItemScoring | None = None
        self._total_steps = float("inf")
        self.last_evaluation: dict[str, Any] | None = None
        """Metrics and segment table of the last test epoch (for reports)."""
        self.init_from: str | None = None
        """A checkpoint whose weights ``fit`` starts from (warm start, ``recforge fit --init_from``;
        :mod:`recforge.trainer.warm_start`); set by the CLI, not a hyper-parameter."""

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

    def eval_user_vectors(self, batch: dict[str, Any]) -> torch.Tensor:
        """User vectors (B, D) of an evaluation batch, such that ``score_batch`` is
        ``users @ eval_item_vectors(1..N).T``; needed for item-chunked and item-sharded
        evaluation (:class:`EvalConfig`)."""
        raise NotImplementedError(f"{type(self).__name__} has no chunked evaluation")

    def eval_item_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Item vectors (n, D) of any item ids: a collective lookup (every rank calls it)."""
        raise NotImplementedError(f"{type(self).__name__} has no chunked evaluation")

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
        if self.init_from is not None and self.trainer.state.fn == "fit":
            from recforge.trainer.warm_start import warm_start

            warm_start(self, self.init_from)  # every rank fills its own shards

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
        self._total_steps = planned_steps(
            self.optim_config, self.trainer.estimated_stepping_batches
        )
        return configure_dense(dense, self.optim_config, self._total_steps)

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
        cfg = self.optim_config
        if cfg.scheduled and cfg.schedule_embeddings and self.fused_optimizer is not None:
            factor = lr_factor(cfg, self.global_step, self._total_steps)
            set_embedding_lr(self.fused_optimizer, self.embedding_optimizer.lr * factor)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["weight"].shape[0]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation()

    def on_test_epoch_start(self) -> None:
        self._start_evaluation()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self.finish_evaluation()
        self._item_scoring = None
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self.finish_evaluation()
        self._item_scoring = None
        metrics = self._log_eval("test")
        out = self._out_dir()  # a collective (broadcast): every rank asks
        self.last_evaluation = {"metrics": metrics, "segments": self._evaluator.segment_table()}
        self.last_evaluation["bias"] = self._bias.details()
        users = getattr(self.trainer.datamodule, "evaluation_users", None)
        if users is not None:
            self.last_evaluation.update(users("test"))
        if self.global_rank == 0:
            _write_json(out / "test_metrics.json", self.last_evaluation)

    # --- helpers ---

    def _new_evaluator(self) -> RankingEvaluator:
        dm, cfg = self.trainer.datamodule, self.eval_config
        evaluator = RankingEvaluator(
            num_items=dm.num_items,
            item_popularity=torch.as_tensor(dm.item_counts),
            ks=tuple(cfg.ks),
            segments=tuple(cfg.segments),
            device=self.device,
        )
        if self._bias is None:  # reads the feature tables once, not every epoch
            self._bias = from_data(
                dm.data_dir,
                dm.manifest,
                dm.item_counts,
                evaluator.segment_k,
                cfg.category,
                cfg.group_by,
                cfg.calibration_alpha,
                self.device,
            )
        self._bias.reset()
        self._bias.attach(evaluator)
        return evaluator

    def _start_evaluation(self) -> None:
        self._evaluator = self._new_evaluator()
        with torch.no_grad():
            self._item_scoring = self._plan_item_scoring()
            if self._bias.needs_item_vectors:  # ILD by embeddings: a collective lookup
                n, step = int(self.trainer.datamodule.num_items), self.eval_config.item_chunk
                ids = [torch.arange(lo, min(n + 1, lo + step)) for lo in range(1, n + 1, step)]
                vectors = [self.eval_item_vectors(i.to(self.device)).float() for i in ids]
                self._bias.set_item_vectors(torch.cat(vectors))
        self.prepare_evaluation()

    def _shard_items(self, world: int) -> bool:
        flag = self.eval_config.shard_items
        if world == 1 or flag is False:
            return False
        if flag is True:
            return True
        info = plan_summary(self._plan).get(self._item_table_name) if self._plan else None
        return (
            info is not None
            and info["sharding_type"] == "row_wise"
            and sorted(info["ranks"]) == list(range(world))
        )

    @property
    def _item_table_name(self) -> str:
        return getattr(getattr(self, "config", None), "table_name", "item_table")

    def _item_range(self, num_items: int, world: int, rank: int) -> tuple[int, int]:
        """Rows ``lo..hi - 1`` (within 1..N) this rank scores: its row-wise shard of the item
        table, else an even split."""
        info = plan_summary(self._plan).get(self._item_table_name) if self._plan else None
        if info is not None and info["sharding_type"] == "row_wise":
            for sh in info["shards"]:
                if sh["rank"] == rank:
                    lo, hi = sh["offsets"][0], sh["offsets"][0] + sh["sizes"][0]
                    return max(lo, 1), max(min(hi, num_items + 1), max(lo, 1))
            return 1, 1
        base, extra = divmod(num_items, world)
        lo = 1 + rank * base + min(rank, extra)
        return lo, lo + base + (rank < extra)

    def _plan_item_scoring(self) -> _ItemScoring | None:
        """How this epoch scores items: None for one (B, N + 1) matrix from ``score_batch``;
        else this rank's item rows and their vectors (a collective lookup on every rank)."""
        n = int(self.trainer.datamodule.num_items)
        world = int(self.trainer.world_size)
        sharded = self._shard_items(world)
        if not sharded and n <= self.eval_config.item_chunk:
            return None
        lo, hi = self._item_range(n, world, self.global_rank) if sharded else (1, n + 1)
        log.info(
            "evaluation: rank %d scores items %d..%d in chunks of %d%s",
            self.global_rank,
            lo,
            hi - 1,
            self.eval_config.item_chunk,
            " for every rank's users (item-sharded)" if sharded else "",
        )
        ids = torch.arange(lo, hi, device=self.device)
        return _ItemScoring(lo, hi, self.eval_item_vectors(ids).float(), sharded)

    def _eval_step(self, batch: dict[str, Any]) -> None:
        if self._item_scoring is not None:
            self._eval_step_chunked(batch, self._item_scoring)
            return
        scores = self.score_batch(batch)  # (B, N + 1)
        self._bias.batch(batch["seen_values"], batch["seen_lengths"], batch.get("user_idx"))
        self._evaluator.update(
            scores.float(),
            batch["target"],
            batch["seen_values"],
            batch["seen_lengths"],
            batch["weight"],
        )

    def _eval_step_chunked(self, batch: dict[str, Any], sc: _ItemScoring) -> None:
        """Score item chunks of ``sc``'s rows; with ``sc.sharded``, for every rank's users."""
        users = self.eval_user_vectors(batch).float()  # (B, D)
        target = batch["target"].to(self.device, torch.int64)
        target_vectors = self.eval_item_vectors(target).float()  # collective: every rank calls
        seen_values = batch["seen_values"].to(self.device, torch.int64)
        seen_lengths = batch["seen_lengths"].to(self.device, torch.int64)
        weight = batch["weight"].to(self.device, torch.float64)
        # This rank's own rows, which finish() hands the bias report (also when item-sharded).
        self._bias.batch(seen_values, seen_lengths, batch.get("user_idx"))
        rows = None
        if sc.sharded:
            sizes = _all_gather_sizes(users.shape[0], self.device)
            start = sum(sizes[: self.global_rank])
            rows = slice(start, start + users.shape[0])
            users, target_vectors, target, seen_lengths, weight = (
                _all_gather_rows(t, sizes)
                for t in (users, target_vectors, target, seen_lengths, weight)
            )
            seen_values = _all_gather_rows(
                seen_values, _all_gather_sizes(seen_values.numel(), self.device)
            )
        chunk = self.eval_config.item_chunk
        partial = self._evaluator.begin(
            target, _pair_scores(users, target_vectors, chunk), seen_values, seen_lengths, weight
        )
        for lo in range(sc.lo, sc.hi, chunk):
            hi = min(sc.hi, lo + chunk)
            partial.add(lo, users @ sc.vectors[lo - sc.lo : hi - sc.lo].T)  # (B, hi - lo)
        if sc.sharded:
            partial.combine()  # the other ranks hold the other items
        self._evaluator.finish(partial, rows)

    def _log_eval(self, prefix: str) -> dict[str, float]:
        metrics = self._evaluator.compute()  # all-reduced: identical on every rank
        metrics.update(self._bias.compute())  # all-reduced too
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


def _pair_scores(users: torch.Tensor, items: torch.Tensor, chunk: int) -> torch.Tensor:
    """``users[i] . items[i]`` (B,) by the same matrix product as the chunk scores (blocks of
    at most ``chunk`` columns), so a target scores as its column would."""
    out = torch.empty(users.shape[0], dtype=users.dtype, device=users.device)
    step = max(1, min(chunk, 1024))
    for lo in range(0, users.shape[0], step):
        hi = min(users.shape[0], lo + step)
        block = users @ items[lo:hi].T  # (B, hi - lo)
        out[lo:hi] = block[
            torch.arange(lo, hi, device=users.device), torch.arange(hi - lo, device=users.device)
        ]
    return out


def _all_gather_sizes(n: int, device: torch.device) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=device))
    return [int(x) for x in sizes]


def _all_gather_rows(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows of ``t`` (rank order); ranks may hold different counts."""
    top = max(sizes)
    if top == 0:
        return t
    padded = t.new_zeros((top, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)
