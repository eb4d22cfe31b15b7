"""Planning and applying TorchRec sharding, and the fused embedding optimizer
(docs/architecture.md §5)."""

from __future__ import annotations

import re
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
DECAYING_EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adam")
WEIGHT_DECAY_MODES = ("l2", "decoupled")


@dataclass
class ShardingConfig:
    """How embedding tables are split across ranks."""

    sharding_types: dict[str, str] = field(default_factory=dict)
    """Per table name: auto | row_wise | table_wise | column_wise | table_row_wise | data_parallel.
    Tables not named here are planned automatically by TorchRec's planner."""
    memory_per_rank: str | None = None
    """Memory the tables may use on each rank, e.g. ``2GB`` or ``512MB`` (GPU memory on CUDA,
    host memory on CPU). The planner splits a table that does not fit one rank (row- or
    column-wise) and a plan that cannot fit stops before training. ``null``: the device's
    memory (on CPU, the host's divided among the local ranks)."""

    def __post_init__(self) -> None:
        if self.memory_per_rank is not None:
            parse_bytes(self.memory_per_rank, "sharding.memory_per_rank")
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
    """Weight decay on the rows a step looks up (rowwise_adagrad and adam only: fbgemm's sgd
    and adagrad kernels have none)."""
    weight_decay_mode: Literal["l2", "decoupled"] = "l2"
    """``l2``: ``weight_decay * row`` is added to the row's gradient, so the adaptive step
    scales it too (torch.optim.Adagrad's meaning; rowwise_adagrad only). ``decoupled``: the
    row shrinks by ``lr * weight_decay`` each step it is looked up, outside the adaptive step
    (AdamW's; fbgemm's adam decays this way only)."""

    def __post_init__(self) -> None:
        if self.name not in EMBEDDING_OPTIMIZERS:
            raise ValueError(
                f"embedding_optimizer.name: {self.name!r}; "
                f"expected one of {', '.join(EMBEDDING_OPTIMIZERS)}"
            )
        if self.lr <= 0:
            raise ValueError(f"embedding_optimizer.lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(
                f"embedding_optimizer.weight_decay: must be >= 0, got {self.weight_decay}"
            )
        if self.weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(
                f"embedding_optimizer.weight_decay_mode: {self.weight_decay_mode!r}; "
                f"expected one of {', '.join(WEIGHT_DECAY_MODES)}"
            )
        # Measured: fbgemm's sgd and adagrad kernels accept weight_decay and leave rows as
        # they are, so a value there would be silently ignored.
        if self.weight_decay > 0 and self.name not in DECAYING_EMBEDDING_OPTIMIZERS:
            raise ValueError(
                f"embedding_optimizer.weight_decay: {self.name} applies no weight decay "
                f"(fbgemm's kernel has none); use one of "
                f"{', '.join(DECAYING_EMBEDDING_OPTIMIZERS)} or weight_decay: 0"
            )
        # fbgemm's Adam kernel takes no mode and always decays AdamW's way.
        if self.weight_decay > 0 and self.name == "adam" and self.weight_decay_mode != "decoupled":
            raise ValueError(
                "embedding_optimizer.weight_decay_mode: adam decays decoupled only (fbgemm's "
                "kernel); set weight_decay_mode: decoupled"
            )

    def apply(self, parameters: list[nn.Parameter], device: torch.device) -> None:
        """Register the fused optimizer on the (unsharded) table parameters, before DMP."""
        from torchrec import optim as trec_optim
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

        if device.type != "cuda" and self.name not in CPU_EMBEDDING_OPTIMIZERS:
            raise ValueError(
                f"embedding_optimizer.name: {self.name!r} has no fused CPU kernel; use one of "
                f"{', '.join(CPU_EMBEDDING_OPTIMIZERS)} on CPU"
            )
        cls = {
            "sgd": trec_optim.SGD,
            "adagrad": trec_optim.Adagrad,
            "rowwise_adagrad": trec_optim.RowWiseAdagrad,
            "adam": trec_optim.Adam,
        }[self.name]
        kwargs: dict[str, Any] = {"lr": self.lr}
        if self.name != "sgd":
            kwargs["eps"] = self.eps
        if self.weight_decay > 0:
            from fbgemm_gpu.split_table_batched_embeddings_ops_training import WeightDecayMode

            # TorchRec passes the optimizer's kwargs on to fbgemm as fused params but never
            # sets the mode, and fbgemm's default mode (NONE) ignores weight_decay.
            kwargs["weight_decay"] = self.weight_decay
            kwargs["weight_decay_mode"] = {
                "l2": WeightDecayMode.L2,
                "decoupled": WeightDecayMode.DECOUPLE,
            }[self.weight_decay_mode]
        apply_optimizer_in_backward(cls, parameters, kwargs)


class ShardingError(ValueError):
    """The tables cannot be placed: one line with the sizes, the budget and the world size."""


_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_bytes(text: str, name: str) -> int:
    """``"2GB"`` -> 2e9 bytes (KB/MB/GB/TB powers of 1000, KiB/MiB/GiB/TiB of 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{name}: {text!r}; expected a size such as 2GB, 512MB or 1.5GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def device_memory(device: torch.device, local_world_size: int) -> int:
    """What one rank may use when ``memory_per_rank`` is not given."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return int(psutil.virtual_memory().total // max(local_world_size, 1))


def table_bytes(model: nn.Module) -> dict[str, int]:
    """Weight bytes of every TorchRec table of ``model`` (fused optimizer state comes on top:
    one value per row for rowwise_adagrad, one per weight for adagrad, two for adam)."""
    out: dict[str, int] = {}
    for module in model.modules():
        configs = getattr(module, "embedding_configs", None) or getattr(
            module, "embedding_bag_configs", None
        )
        if not callable(configs):
            continue
        for cfg in configs():
            out[cfg.name] = cfg.num_embeddings * cfg.embedding_dim * 4
    return out


def shard(
    model: nn.Module, config: ShardingConfig, device: torch.device, local_world_size: int
) -> tuple[nn.Module, Any]:
    """Plan over the real topology and memory budget (rank 0 plans, every rank gets the plan or
    the same :class:`ShardingError`), then wrap ``model`` in ``DistributedModelParallel``."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints

    world_size = dist.get_world_size()
    local = min(local_world_size, world_size)
    budget = (
        parse_bytes(config.memory_per_rank, "sharding.memory_per_rank")
        if config.memory_per_rank is not None
        else device_memory(device, local)
    )
    on_gpu = device.type == "cuda"
    topology = Topology(
        world_size=world_size,
        compute_device=device.type,
        local_world_size=local,
        hbm_cap=budget if on_gpu else None,
        ddr_cap=None if on_gpu else budget,
    )
    constraints = {
        table: ParameterConstraints(sharding_types=[kind])
        for table, kind in config.sharding_types.items()
        if kind != "auto"
    }
    sharders = [EmbeddingCollectionSharder(), EmbeddingBagCollectionSharder()]
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    # Not planner.collective_plan: when rank 0's planning fails, the other ranks would wait for
    # its broadcast forever. Here the failure itself is broadcast.
    result: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            result[0] = planner.plan(model, sharders)
        except Exception as exc:  # the planner's PlannerError and its relatives
            result[0] = ShardingError(_cannot_fit(model, config, budget, world_size, on_gpu, exc))
    dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], ShardingError):
        raise result[0]
    plan = result[0]
    _check_constraints_met(plan, config)
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    return dmp, plan


def _cannot_fit(
    model: nn.Module,
    config: ShardingConfig,
    budget: int,
    world_size: int,
    on_gpu: bool,
    exc: Exception,
) -> str:
    sizes = table_bytes(model)
    tables = ", ".join(
        f"{name} {_human(n)}"
        + (f" ({config.sharding_types[name]})" if name in config.sharding_types else "")
        for name, n in sorted(sizes.items(), key=lambda kv: -kv[1])
    )
    source = (
        f"sharding.memory_per_rank={config.memory_per_rank}"
        if config.memory_per_rank is not None
        else "the device's memory"
    )
    # The planner's last error says which shard did not fit where; its first line is generic.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    last = [i for i, line in enumerate(lines) if line.startswith("Last planner error")]
    reason = (
        lines[last[-1] + 1]
        if last and last[-1] + 1 < len(lines)
        else (lines[0] if lines else type(exc).__name__)
    )
    return (
        f"sharding: the embedding tables do not fit: tables (fp32 weights) {tables}, total "
        f"{_human(sum(sizes.values()))}; budget {_human(budget)} of "
        f"{'GPU' if on_gpu else 'host'} memory per rank ({source}) x world size {world_size} "
        f"= {_human(budget * world_size)}, of which TorchRec's planner keeps 15% in reserve "
        f"and needs room for optimizer state and buffers. Raise memory_per_rank, add ranks, "
        f"shrink the tables or allow row_wise/column_wise sharding (planner: {reason})"
    )


def plan_memory(summary: dict[str, dict[str, Any]]) -> dict[str, dict[int, int]]:
    """Per table, weight bytes (fp32) held by each rank, from a :func:`plan_summary`."""
    out: dict[str, dict[int, int]] = {}
    for table, entry in summary.items():
        per_rank: dict[int, int] = {}
        for shard in entry["shards"]:
            n = 4
            for size in shard["sizes"]:
                n *= int(size)
            per_rank[shard["rank"]] = per_rank.get(shard["rank"], 0) + n
        out[table] = per_rank
    return out


def memory_report(summary: dict[str, dict[str, Any]]) -> str:
    """The plan as people read it: per table, its sharding and the bytes on each rank."""
    lines = []
    for table, per_rank in plan_memory(summary).items():
        ranks = ", ".join(f"rank {r}: {_human(n)}" for r, n in sorted(per_rank.items()))
        lines.append(f"{table} ({summary[table]['sharding_type']}): {ranks}")
    return "\n".join(lines)


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
