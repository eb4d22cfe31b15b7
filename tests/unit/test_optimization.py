"""The learning-rate schedule: its shape, its refusal without a planned length, and that the
embedding rate really reaches TorchRec's fused kernel."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from recforge.trainer.optimization import (
    DenseOptimizerConfig,
    configure_dense,
    lr_factor,
    planned_steps,
)


def test_warmup_then_cosine_reaches_the_floor_at_the_last_step() -> None:
    cfg = DenseOptimizerConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(cfg, 0, 110) == pytest.approx(0.1)
    assert lr_factor(cfg, 9, 110) == pytest.approx(1.0)
    assert lr_factor(cfg, 10, 110) == pytest.approx(1.0)
    assert lr_factor(cfg, 60, 110) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lr_factor(cfg, 110, 110) == pytest.approx(0.1)
    assert lr_factor(cfg, 500, 110) == pytest.approx(0.1)  # past the plan: stays at the floor
    factors = [lr_factor(cfg, s, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))


def test_linear_and_constant() -> None:
    lin = DenseOptimizerConfig(schedule="linear")
    assert [lr_factor(lin, s, 4) for s in range(5)] == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    const = DenseOptimizerConfig()
    assert not const.scheduled
    assert lr_factor(const, 1000, math.inf) == 1.0


def test_decay_needs_a_planned_length() -> None:
    with pytest.raises(ValueError, match="trainer.max_epochs or trainer.max_steps"):
        planned_steps(DenseOptimizerConfig(schedule="cosine"), math.inf)
    assert planned_steps(DenseOptimizerConfig(warmup_steps=5), math.inf) == math.inf


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("schedule", "step", "optimizer.schedule"),
        ("min_lr_ratio", 1.5, "optimizer.min_lr_ratio"),
        ("warmup_steps", -1, "optimizer.warmup_steps"),
    ],
)
def test_bad_fields_are_named(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DenseOptimizerConfig(**{field: value})


def test_dense_scheduler_follows_the_factor() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    cfg = DenseOptimizerConfig(lr=0.01, schedule="linear")
    conf = configure_dense([p], cfg, total_steps=4)
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.01, 0.0075, 0.005, 0.0025])


KERNEL_SCRIPT = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    from torch.distributed import TCPStore
    store = TCPStore("127.0.0.1", 0, 1, True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    from recforge.models.sasrec import SASRec, SASRecConfig
    from recforge.trainer.optimization import set_embedding_lr
    from recforge.trainer.sharding import EmbeddingOptimizerConfig, ShardingConfig, shard
    model = SASRec(SASRecConfig(num_items=20, max_len=8, dim=8), device=torch.device("meta"))
    EmbeddingOptimizerConfig(lr=0.05).apply(
        list(model.embedding_collection.parameters()), torch.device("cpu")
    )
    net, _ = shard(model, ShardingConfig(), torch.device("cpu"), 1)

    def kernel_rates(opt):
        if hasattr(opt, "_emb_module"):
            return [opt._emb_module.get_learning_rate()]
        return [r for _, sub in getattr(opt, "_optims", []) for r in kernel_rates(sub)]

    before = kernel_rates(net.fused_optimizer)
    set_embedding_lr(net.fused_optimizer, 0.0125)
    print(before, kernel_rates(net.fused_optimizer))
    """
)


def test_embedding_rate_reaches_the_fused_kernel() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", KERNEL_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = eval(proc.stdout.strip().splitlines()[-1].replace("] [", "], ["))
    assert before and all(r == pytest.approx(0.05) for r in before)
    assert len(after) == len(before) and all(r == pytest.approx(0.0125) for r in after)


DECAY_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from torch.distributed import TCPStore
    from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
    from recforge.trainer.sharding import EmbeddingOptimizerConfig, ShardingConfig, shard
    store = TCPStore("127.0.0.1", 0, 1, True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    table = EmbeddingConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"])
    for decay, mode in [(0.0, "l2"), (0.5, "l2"), (0.5, "decoupled")]:
        torch.manual_seed(0)
        ec = EmbeddingCollection(tables=[table], device=torch.device("meta"))
        EmbeddingOptimizerConfig(lr=0.1, weight_decay=decay, weight_decay_mode=mode).apply(
            list(ec.parameters()), torch.device("cpu")
        )
        net, _ = shard(ec, ShardingConfig(), torch.device("cpu"), 1)
        rows = lambda: net.state_dict()["embeddings.t.weight"].local_tensor()[[1, 2, 3, 7]]
        before = rows().clone()
        ids = KeyedJaggedTensor.from_lengths_sync(
            keys=["f"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 1])
        )
        # A zero loss: any change to a looked-up row is the decay alone.
        (net(ids)["f"].values().sum() * 0.0).backward()
        ratio = (rows().norm(dim=1) / before.norm(dim=1)).tolist()
        rms = before.pow(2).mean(dim=1).sqrt().tolist()
        print(decay, mode, ratio, rms)
    """
)


def test_embedding_weight_decay_reaches_the_fused_kernel() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", DECAY_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln[:1].isdigit()]
    ratios, rms = {}, {}
    for line in lines:
        decay, mode, rest = line.split(" ", 2)
        ratios[f"{decay} {mode}"], rms[f"{decay} {mode}"] = eval(rest.replace("] [", "], ["))
    # Row 7 is not looked up: no step touches it, whatever the decay.
    assert all(r[3] == pytest.approx(1.0) for r in ratios.values())
    assert ratios["0.0 l2"][:3] == pytest.approx([1.0] * 3)
    # Decoupled: exactly lr * weight_decay per step.
    assert ratios["0.5 decoupled"][:3] == pytest.approx([1 - 0.1 * 0.5] * 3, rel=1e-5)
    # L2 through row-wise Adagrad: the gradient is weight_decay * row alone, which the step
    # divides by its own root mean square, so the row shrinks by lr / rms(row).
    expected = [abs(1 - 0.1 / r) for r in rms["0.5 l2"][:3]]
    assert ratios["0.5 l2"][:3] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("name", ["sgd", "adagrad"])
def test_weight_decay_on_a_kernel_without_it_is_refused(name: str) -> None:
    from recforge.trainer.sharding import EmbeddingOptimizerConfig

    with pytest.raises(ValueError, match=rf"embedding_optimizer.weight_decay: {name} applies no"):
        EmbeddingOptimizerConfig(name=name, weight_decay=0.01)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight_decay_mode: 'adamw'"):
        EmbeddingOptimizerConfig(weight_decay_mode="adamw")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="adam decays decoupled only"):
        EmbeddingOptimizerConfig(name="adam", weight_decay=0.01)
    EmbeddingOptimizerConfig(name="adam", weight_decay=0.01, weight_decay_mode="decoupled")
