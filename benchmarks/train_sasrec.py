"""Training speed of SASRec on ML-1M with the settings of the earlier 2-block
`configs/sasrec/ml1m.yaml` (batch 128, attention dropout 0.2), beside its arithmetic floor.

    python benchmarks/train_sasrec.py [--data runs/data/ml1m] [--steps 30] [--device cpu|cuda]

It runs the real training step (DistributedModelParallel over the item table with the fused
row-wise Adagrad, AdamW on the dense part, world size 1) on real ML-1M batches from the
DataModule, and reports tokens/s (real next-item targets) and seconds per epoch.

The floor is the FLOPs of one epoch divided by the machine's measured matmul rate (the best of
the model's logits and feed-forward GEMM shapes and a 2048^3 square, i.e. about the machine's
peak). Two FLOP counts are printed, each with its floor:

- executed: what the step computes, as ``torch.utils.flop_counter`` counts it (every matmul,
  forward and backward; the position-wise layers and the loss on real positions only), with
  attention counted over the whole (L, L) score matrix of the padded (B, L) batch, which is
  what the unfused attention that attention dropout needs executes (CPU flash attention, with
  ``--attention-dropout 0``, skips the blocks above the diagonal);
- necessary: the same, but attention only over the causal pairs of real positions, i.e.
  ``6 D n (n + 1)`` per layer for a sequence of n real positions (QK^T and PV, forward and
  backward). No implementation of this model can do less arithmetic.

Both are computed for the whole epoch: the linear part (everything but attention) per real
token times the epoch's tokens, plus attention from every batch's lengths. Attention is taken
out of the counter's total and counted from the shapes, because the counter does not see CPU
flash attention (``--attention-dropout 0``). Prints a table; run with OMP_NUM_THREADS=1 and =2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recforge.data.datamodule import SequenceDataModule  # noqa: E402
from recforge.models.sasrec import SASRec, SASRecConfig  # noqa: E402
from recforge.trainer.host_memory import keep_freed_memory  # noqa: E402
from recforge.trainer.sharding import EmbeddingOptimizerConfig, ShardingConfig, shard  # noqa: E402


def matmul_rate(device: torch.device, dim: int, num_items: int, tokens: int) -> float:
    """Best FLOP/s over GEMM shapes of this model (logits, FFN, square)."""
    shapes = [(tokens, dim, num_items), (tokens, dim, 4 * dim), (2048, 2048, 2048)]
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device)
        b = torch.randn(k, n, device=device)
        for _ in range(2):
            a @ b
        reps = 5
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - start))
    return best


def is_attention_op(op: str) -> bool:
    """Whether a counted op is attention's: in SASRec only attention issues batched matmuls (its
    linear layers and the loss use mm/addmm), and SDPA kernels name themselves."""
    return op in ("aten.bmm", "aten.baddbmm") or "attention" in op


def attention_flops_padded(batch: int, length: int, dim: int, layers: int) -> float:
    """QK^T and PV over the whole (L, L) score matrix of every row, forward (4 B L^2 D) and
    backward (twice that), per layer."""
    return 12.0 * batch * length * length * dim * layers


def attention_flops_causal(lengths: torch.Tensor, dim: int, layers: int) -> float:
    """The same over the n (n + 1) / 2 causal pairs of each row's n real positions."""
    n = lengths.to(torch.float64)
    return float(6.0 * dim * layers * (n * (n + 1)).sum())


def _tokens(batch: dict) -> int:
    return int(batch["lengths"].sum())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ensure_data(path: Path) -> None:
    if (path / "manifest.json").is_file():
        return
    from recforge.data.prepare import PrepareConfig, prepare

    source = REPO.parent / "shared" / "data" / "ml-1m.txt"
    if not source.is_file():
        sys.exit(f"{path} is not prepared and {source} is missing")
    prepare(PrepareConfig(input=[str(source)], format="sasrec-txt", out=str(path)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(REPO / "runs" / "data" / "ml1m"))
    parser.add_argument(
        "--steps", type=int, default=30, help="timed training steps (after 3 warm-up steps)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument(
        "--attention-dropout",
        type=float,
        default=0.2,
        help="0.2 as in the earlier ml1m.yaml; 0 (today's configs) lets CPU attention use the "
        "fused kernel",
    )
    parser.add_argument(
        "--train-windows",
        choices=("last", "all"),
        default="all",
        help="'all' as in configs/sasrec/ml1m*.yaml (more steps per epoch, same step)",
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    malloc_tuned = keep_freed_memory()
    ensure_data(Path(args.data))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29612")
    torch.distributed.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1
    )
    torch.manual_seed(0)

    dm = SequenceDataModule(
        args.data,
        batch_size=args.batch_size,
        max_len=args.max_len,
        train_windows=args.train_windows,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    steps_per_epoch = len(loader)
    config = SASRecConfig(
        num_items=dm.num_items,
        max_len=args.max_len,
        dim=args.dim,
        num_layers=2,
        num_heads=1,
        dropout=0.2,
        attention_dropout=args.attention_dropout,
        loss="ce",
    )
    model = SASRec(config, device=torch.device("meta"))
    model.set_item_frequencies(torch.as_tensor(dm.item_counts, dtype=torch.float32))
    EmbeddingOptimizerConfig(name="rowwise_adagrad", lr=0.05).apply(
        list(model.embedding_collection.parameters()), device
    )
    dmp, _ = shard(model, ShardingConfig(), device, 1)
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    dense = torch.optim.AdamW(
        [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())], lr=1e-3
    )

    batches = []
    for batch in loader:
        batches.append({k: v.to(device) for k, v in batch.items()})
        if len(batches) == args.steps + 3:
            break

    def step(batch: dict) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, _ = dmp(
                batch["input_ids"], batch["lengths"], batch["target_ids"], batch["weight"]
            )
        loss.backward()
        dense.step()
        dense.zero_grad(set_to_none=True)

    dmp.train()
    for batch in batches[:3]:
        step(batch)
    _sync(device)
    timed = batches[3:]
    step_times = []
    for batch in timed:
        start = time.perf_counter()
        step(batch)
        _sync(device)
        step_times.append(time.perf_counter() - start)
    elapsed = sum(step_times)

    from torch.utils.flop_counter import FlopCounterMode

    counted = timed[:3]
    counter = FlopCounterMode(display=False)
    with counter:
        for batch in counted:
            step(batch)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    attention_counted = sum(n for op, n in by_op.items() if is_attention_op(op))
    linear_per_token = (counter.get_total_flops() - attention_counted) / sum(
        _tokens(b) for b in counted
    )
    layers = config.num_layers
    epoch_batches = [
        (b["input_ids"].shape, b["lengths"]) for b in loader
    ]  # the whole epoch, from the data
    epoch_tokens = sum(int(lengths.sum()) for _, lengths in epoch_batches)
    executed = linear_per_token * epoch_tokens + sum(
        attention_flops_padded(shape[0], shape[1], args.dim, layers) for shape, _ in epoch_batches
    )
    necessary = linear_per_token * epoch_tokens + sum(
        attention_flops_causal(lengths, args.dim, layers) for _, lengths in epoch_batches
    )
    tokens = sum(_tokens(b) for b in timed)
    rate = matmul_rate(device, args.dim, dm.num_items, tokens // len(timed))

    step_s = elapsed / len(timed)
    epoch_s = step_s * steps_per_epoch
    print(
        f"device: {device} ({torch.get_num_threads()} threads)  data: {args.data}  "
        f"B={args.batch_size} L={args.max_len} D={args.dim} "
        f"attention dropout={args.attention_dropout}  "
        f"train windows={args.train_windows}  steps/epoch={steps_per_epoch}  "
        f"malloc keeps freed memory: {'yes' if malloc_tuned else 'no'}"
    )
    rows = [
        ("training tokens/s", f"{tokens / elapsed:,.0f}"),
        ("samples/s", f"{len(timed) * args.batch_size / elapsed:,.0f}"),
        ("seconds/step", f"{step_s:.3f}"),
        (
            "seconds/step (median, fastest)",
            f"{statistics.median(step_times):.3f}, {min(step_times):.3f}",
        ),
        ("seconds/epoch (measured rate)", f"{epoch_s:.1f}"),
        ("tokens/epoch", f"{epoch_tokens:,}"),
        ("matmul rate GFLOP/s (measured)", f"{rate / 1e9:.1f}"),
        ("GFLOP/epoch executed (fwd+bwd)", f"{executed / 1e9:,.0f}"),
        ("floor seconds/epoch, executed", f"{executed / rate:.1f}"),
        ("measured / floor, executed", f"{epoch_s / (executed / rate):.2f}x"),
        ("GFLOP/epoch necessary (fwd+bwd)", f"{necessary / 1e9:,.0f}"),
        ("floor seconds/epoch, necessary", f"{necessary / rate:.1f}"),
        ("measured / floor, necessary", f"{epoch_s / (necessary / rate):.2f}x"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:>14}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
