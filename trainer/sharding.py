"""Planning and applying TorchRec sharding, and the fused embedding optimizer
(docs/architecture.md §5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

SHARDING_TYPES = (
    "auto",
    "row_wise",
    "table_wise",
    "column_wise",
    "table_row_wise",
    "data_parallel",
)
EMBEDDING_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")
# fbgemm's CPU kernels implement these fused optimizers only; Adam needs CUDA.
CPU_EMBEDDING_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")


@dataclass
class ShardingConfig:
    """How embedding tables are split across ranks."""

    sharding_types: dict[str, str] = field(default_factory=dict)
    """Per table name: auto | row_wise | table_wise | column_wise | table_row_wise | data_parallel.
    Tables not named here are planned automatically by TorchRec's planner."""

    def __post_init__(self) -> None:
        for table, kind in self.sharding_types.items():
            if kind not in SHARDING_TYPES:
                raise ValueError(
                    f"sharding.sharding_types.{table}: {kind!r}; "
                    f"expected one of {', '.join(SHARDING_TYPES)}"
                )


@dataclass
class EmbeddingOptimizerConfig:
    """The optimizer fused into the embedding backward pass (one update per row per step)."""

    name: Literal["sgd", "adagrad", "rowwise_adagrad", "adam"] = "rowwise_adagrad"
    """Fused optimizer; on CPU only sgd, adagrad and rowwise_adagrad exist (fbgemm)."""
    lr: float = 0.05
    """Learning rate of the embedding tables."""
    eps: float = 1e-8
    """Numerical epsilon (adagrad, adam)."""
    weight_decay: float = 0.0
    """L2 penalty on looked-up rows."""

    def __post_init__(self) -> None:
        if self.name not in EMBEDDING_OPTIMIZERS:
            raise ValueError(
                f"embedding_optimizer.name: {self.name!r}; "
                f"expected one of {', '.join(EMBEDDING_OPTIMIZERS)}"
            )
        if self.lr <= 0:
            raise ValueError(f"embedding_optimizer.lr: must be > 0, got {self.lr}")

    def apply(self, parameters: list[nn.Parameter], device: torch.device) -> None:
        """Register the fused optimizer on the (unsharded) table parameters, before DMP."""
        from torchrec import optim as trec_optim
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

        if device.type != "cuda" and self.name not in CPU_EMBEDDING_OPTIMIZERS:
            raise ValueError(
                f"embedding_optimizer.name: {self.name!r} has no fused CPU kernel; use one of "
                f"{', '.join(CPU_EMBEDDING_OPTIMIZERS)} on CPU"
            )
        cls, kwargs = {
            "sgd": (trec_optim.SGD, {"lr": self.lr, "weight_decay": self.weight_decay}),
            "adagrad": (
                trec_optim.Adagrad,
                {"lr": self.lr, "eps": self.eps, "weight_decay": self.weight_decay},
            ),
            "rowwise_adagrad": (
                trec_optim.RowWiseAdagrad,
                {"lr": self.lr, "eps": self.eps, "weight_decay": self.weight_decay},
            ),
            "adam": (
                trec_optim.Adam,
                {"lr": self.lr, "eps": self.eps, "weight_decay": self.weight_decay},
            ),
        }[self.name]
        apply_optimizer_in_backward(cls, parameters, kwargs)


def shard(
    model: nn.Module, config: ShardingConfig, device: torch.device, local_world_size: int
) -> tuple[nn.Module, Any]:
    """Plan over the real topology (collectively) and wrap ``model`` in
    ``DistributedModelParallel``."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints

    world_size = dist.get_world_size()
    topology = Topology(
        world_size=world_size,
        compute_device=device.type,
        local_world_size=min(local_world_size, world_size),
    )
    constraints = {
        table: ParameterConstraints(sharding_types=[kind])
        for table, kind in config.sharding_types.items()
        if kind != "auto"
    }
    sharders = [EmbeddingCollectionSharder(), EmbeddingBagCollectionSharder()]
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    _check_constraints_met(plan, config)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    return dmp, plan


def _check_constraints_met(plan: Any, config: ShardingConfig) -> None:
    planned = plan_summary(plan)
    for table in config.sharding_types:
        if table not in planned:
            raise ValueError(
                f"sharding.sharding_types names table {table!r}, but the model has tables "
                f"{sorted(planned)}"
            )


def plan_summary(plan: Any) -> dict[str, dict[str, Any]]:
    """Per table: module path, sharding type, compute kernel, ranks and shards (offsets, sizes,
    rank)."""
    out: dict[str, dict[str, Any]] = {}
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():
            shards = []
            spec = getattr(ps, "sharding_spec", None)
            for shard in getattr(spec, "shards", None) or []:
                placement = shard.placement
                shards.append(
                    {
                        "offsets": list(shard.shard_offsets),
                        "sizes": list(shard.shard_sizes),
                        "rank": placement.rank() if placement is not None else None,
                    }
                )
            out[table] = {
                "module": module_path,
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": list(ps.ranks or []),
                "shards": shards,
            }
    return out


def local_shards(state_dict: dict[str, Any]) -> dict[str, list[dict[str, list[int]]]]:
    """This rank's shards of every sharded tensor: offsets and sizes (evidence of real sharding)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    out = {}
    for key, value in state_dict.items():
        if isinstance(value, ShardedTensor):
            out[key] = [
                {"offsets": list(s.metadata.shard_offsets), "sizes": list(s.metadata.shard_sizes)}
                for s in value.local_shards()
            ]
    return out
