"""Elastic resume (docs/architecture.md §5): a tiny SASRec run trained on 2 ranks resumes on 1
rank and back on 2, with the row-wise fused optimizer state resharded with its rows; a changed
sharding type is refused unless the embedding optimizer is reset; the data sampler converts a
mid-epoch position to another world size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback

from recforge.data.loader import EpochBatchSampler, EpochPlan
from recforge.trainer.checkpoint import CheckpointError, check_plan

REPO = Path(__file__).resolve().parents[2]
RECFORGE = str(Path(sys.executable).with_name("recforge"))
TINY = str(REPO / "configs" / "sasrec" / "tiny.yaml")
PROBE_ENV = "RECFORGE_TEST_PROBE_DIR"
MOMENTUM = (
    "fused_optimizer.state.embedding_collection.embeddings.item_table.weight.item_table.momentum1"
)
WEIGHT = "model.embedding_collection.embeddings.item_table.weight"


class FusedStateProbe(Callback):
    """Loaded by the runs below (``--trainer.callbacks+=``): at the start of training, right
    after a resume has loaded the checkpoint, each rank writes its shards of the fused optimizer
    state and the item table, the epoch and the number of batches per epoch."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        def shards(value: Any) -> list[tuple[list[int], torch.Tensor]]:
            if isinstance(value, ShardedTensor):
                return [
                    (list(s.metadata.shard_offsets), s.tensor.detach().clone())
                    for s in value.local_shards()
                ]
            return [([0] * value.dim(), value.detach().clone())]

        state: dict[str, Any] = {}
        for param, per_param in pl_module.fused_optimizer.state_dict()["state"].items():
            for name, value in per_param.items():
                state[f"fused_optimizer.state.{param}.{name}"] = shards(value)
        for key, value in pl_module.sharded_state_dict().items():
            if "item_table" in key:
                state[f"model.{key}"] = shards(value)
        out = Path(os.environ[PROBE_ENV])
        out.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "state": state,
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                "num_training_batches": trainer.num_training_batches,
            },
            out / f"rank{trainer.global_rank}.pt",
        )


def full_from_probe(probe: Path, key: str, size: torch.Size) -> torch.Tensor:
    """Assemble the whole tensor ``key`` from every rank's probe file."""
    full = torch.full(size, float("nan"))
    for path in sorted(probe.glob("rank*.pt")):
        for offsets, tensor in torch.load(path, weights_only=False)["state"][key]:
            full[tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))] = tensor
    return full


def full_from_checkpoint(ckpt: Path, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Whole tensors from a DCP checkpoint, read in this one process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    state = {k: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in keys}
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    return state


def recforge(
    *args: str, cwd: Path, probe: Path | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).parent), *filter(None, [env.get("PYTHONPATH")])]
    )
    if probe is not None:
        env[PROBE_ENV] = str(probe)
        args = (*args, "--trainer.callbacks+=test_elastic_resume.FusedStateProbe")
    return subprocess.run(
        [RECFORGE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def fit(root: Path, data: Path, devices: int, epochs: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        TINY,
        "--data.data_dir",
        str(data),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.logger.init_args.save_dir",
        str(root),
        "--trainer.devices",
        str(devices),
        "--trainer.max_epochs",
        str(epochs),
        "--test_after_fit",
        "false",
        "--mlflow.enabled",
        "false",
        *extra,
    ]


def last_ckpt(root: Path) -> Path:
    return root / "sasrec-tiny" / "version_0" / "checkpoints" / "last.ckpt"


def trainer_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / "trainer_state.pt", weights_only=False)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny config on 2 ranks for 2 epochs; its last.ckpt is the starting point below."""
    tmp = tmp_path_factory.mktemp("elastic")
    data, root = tmp / "data", tmp / "two"
    proc = recforge(*fit(root, data, 2, 2), cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"tmp": tmp, "data": data, "ckpt": last_ckpt(root)}


def test_resume_on_one_rank_then_back_on_two(two_rank_run: dict[str, Path]) -> None:
    tmp, data, first = two_rank_run["tmp"], two_rank_run["data"], two_rank_run["ckpt"]
    saved = trainer_state(first)
    assert saved["epoch"] == 1 and saved["recforge"]["world_size"] == 2
    assert saved["recforge"]["plan"]["item_table"]["sharding_type"] == "row_wise"
    before = full_from_checkpoint(first, (MOMENTUM, WEIGHT))
    assert before[MOMENTUM].abs().sum() > 0  # rowwise_adagrad has accumulated something

    # 2 -> 1: the loaded state equals the saved one, row for row.
    probe1, one = tmp / "probe1", tmp / "one"
    proc = recforge(*fit(one, data, 1, 3, "--ckpt_path", str(first)), cwd=tmp, probe=probe1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming under another plan (world size 2 -> 1" in proc.stderr
    assert "fused embedding optimizer state with it" in proc.stderr
    for key in (MOMENTUM, WEIGHT):
        loaded = full_from_probe(probe1, key, before[key].shape)
        assert torch.equal(loaded, before[key]), key
    info = torch.load(probe1 / "rank0.pt", weights_only=False)
    # The epoch counter continues; one rank has twice the batches per epoch (400 / 64).
    assert info["epoch"] == 2 and info["num_training_batches"] == 7
    second = last_ckpt(one)
    state = trainer_state(second)
    assert state["epoch"] == 2 and state["recforge"]["world_size"] == 1
    assert state["global_step"] == saved["global_step"] + 7

    # 1 -> 2: back on two ranks, each rank gets its half of the rows and their state.
    middle = full_from_checkpoint(second, (MOMENTUM, WEIGHT))
    assert not torch.equal(middle[MOMENTUM], before[MOMENTUM])  # epoch 2 trained
    probe2, two = tmp / "probe2", tmp / "two_again"
    proc = recforge(*fit(two, data, 2, 4, "--ckpt_path", str(second)), cwd=tmp, probe=probe2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "world size 1 -> 2" in proc.stderr
    for key in (MOMENTUM, WEIGHT):
        loaded = full_from_probe(probe2, key, middle[key].shape)
        assert torch.equal(loaded, middle[key]), key
    assert torch.load(probe2 / "rank1.pt", weights_only=False)["epoch"] == 3
    state = trainer_state(last_ckpt(two))
    assert state["epoch"] == 3 and state["recforge"]["world_size"] == 2
    assert state["global_step"] == saved["global_step"] + 7 + 4


def test_a_changed_sharding_type_is_refused_unless_the_optimizer_is_reset(
    two_rank_run: dict[str, Path],
) -> None:
    tmp, data, ckpt = two_rank_run["tmp"], two_rank_run["data"], two_rank_run["ckpt"]
    table_wise = ["--model.init_args.sharding.sharding_types", '{"item_table": "table_wise"}']
    args = fit(tmp / "tw", data, 1, 3, *table_wise, "--ckpt_path", str(ckpt))
    proc = recforge(*args, cwd=tmp)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert "table item_table: row_wise on ranks [0, 1] -> table_wise on ranks [0]" in proc.stderr
    assert "the sharding type changed" in proc.stderr
    assert "--reset_embedding_optimizer" in proc.stderr

    probe = tmp / "probe_reset"
    reset = fit(tmp / "tw2", data, 1, 3, *table_wise, "--ckpt_path", str(ckpt))
    proc = recforge(*reset, "--reset_embedding_optimizer", "true", cwd=tmp, probe=probe)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "loading the weights only; the fused embedding optimizer starts" in proc.stderr
    saved = full_from_checkpoint(ckpt, (MOMENTUM, WEIGHT))
    # The weights are loaded (resharded to table_wise), the optimizer state starts at zero.
    assert torch.equal(full_from_probe(probe, WEIGHT, saved[WEIGHT].shape), saved[WEIGHT])
    assert not full_from_probe(probe, MOMENTUM, saved[MOMENTUM].shape).any()
    assert torch.load(probe / "rank0.pt", weights_only=False)["epoch"] == 2


def test_fit_help_lists_reset_embedding_optimizer(tmp_path: Path) -> None:
    proc = recforge("fit", "--help", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--reset_embedding_optimizer" in proc.stdout


# ------------------------------------------------------------------------ check_plan, sampler


def entry(kind: str, shards: list[tuple[int, int, int]], kernel: str = "fused") -> dict[str, Any]:
    """A plan summary entry: shards as (row offset, rows, rank), 8 columns."""
    return {
        "module": "embedding_collection",
        "sharding_type": kind,
        "compute_kernel": kernel,
        "ranks": sorted({r for _, _, r in shards}),
        "shards": [{"offsets": [o, 0], "sizes": [n, 8], "rank": r} for o, n, r in shards],
    }


def test_check_plan_allows_a_world_size_change_that_reshards() -> None:
    for kind in ("row_wise", "table_wise"):
        two = {"t": entry(kind, [(0, 51, 0), (51, 50, 1)] if kind == "row_wise" else [(0, 101, 1)])}
        one = {"t": entry(kind, [(0, 101, 0)])}
        changes = check_plan("ck", two, one, 2, 1)
        assert changes[0] == "world size 2 -> 1" and changes[1].startswith("table t:")
        assert check_plan("ck", one, two, 1, 2)
    same = {"t": entry("row_wise", [(0, 101, 0)])}
    assert check_plan("ck", same, same, 1, 1) == []
    # Column-wise state is laid out per shard: carried only when the shards keep their geometry.
    cw = {"t": entry("column_wise", [(0, 101, 0)])}
    moved = {"t": entry("column_wise", [(0, 101, 1)])}
    assert check_plan("ck", cw, moved, 1, 2)


def test_check_plan_refuses_what_the_optimizer_state_cannot_follow() -> None:
    rw = {"t": entry("row_wise", [(0, 51, 0), (51, 50, 1)])}
    cases = {
        "the sharding type changed": {"t": entry("table_wise", [(0, 101, 0)])},
        "compute kernel fused -> fused_uvm_caching": {
            "t": entry("row_wise", [(0, 101, 0)], kernel="fused_uvm_caching")
        },
    }
    for why, current in cases.items():
        with pytest.raises(CheckpointError, match="table t: ") as err:
            check_plan("ck", rw, current, 2, 1)
        assert why in str(err.value)
        # With the optimizer reset, the weights alone are loaded: no refusal.
        assert check_plan("ck", rw, current, 2, 1, reset_embedding_optimizer=True)
    cw = {"t": {**entry("row_wise", [(0, 101, 0)]), "sharding_type": "column_wise"}}
    split = {"t": {**entry("row_wise", [(0, 51, 0), (51, 50, 1)]), "sharding_type": "column_wise"}}
    with pytest.raises(CheckpointError, match="laid out per shard"):
        check_plan("ck", cw, split, 1, 2)
    # A table on one side only is another model: refused even with a reset.
    with pytest.raises(CheckpointError, match="other embedding tables"):
        check_plan(
            "ck",
            rw,
            {**rw, "u": entry("row_wise", [(0, 9, 0)])},
            2,
            2,
            reset_embedding_optimizer=True,
        )


def sampler(examples: int, batch_size: int, world: int, rank: int = 0) -> EpochBatchSampler:
    class Stub:
        def __init__(self) -> None:
            self.batch_size, self.world_size, self.rank = batch_size, world, rank
            self.shuffle, self.seed = True, 0
            self.index = SimpleNamespace(num_examples=examples)

        def __len__(self) -> int:
            return EpochPlan.count_batches(examples, batch_size, world)

    return EpochBatchSampler(Stub())  # type: ignore[arg-type]


def test_sampler_converts_a_mid_epoch_position_to_another_world_size(
    caplog: pytest.LogCaptureFixture,
) -> None:
    two = sampler(1000, 64, 2)  # global batches of 128: 8 in the epoch
    two.set_epoch(5)
    keys = iter(two)
    for _ in range(3):
        next(keys)
    state = two.state_dict()
    assert state == {"epoch": 5, "batches_consumed": 3, "world_size": 2, "batch_size": 64}

    one = sampler(1000, 64, 1)  # global batches of 64: 16 in the epoch
    with caplog.at_level("INFO", logger="recforge.data.loader"):
        one.load_state_dict(state)
    one.set_epoch(5)
    # 3 x 128 = 384 examples consumed: batch 6 of 64 (exactly, none seen twice).
    assert len(one) == 16 - 6 and list(iter(one))[0] == (5, 6)
    assert "384 examples consumed -> batch 6 of 16; 0 examples are seen twice" in caplog.text

    three = sampler(1000, 64, 3)  # global batches of 192: 384 // 192 = 2, exact again
    three.load_state_dict(state)
    assert len(three) == 6 - 2
    five = sampler(1000, 50, 1)  # 384 // 50 = 7 (350): 34 examples are seen twice
    with caplog.at_level("INFO", logger="recforge.data.loader"):
        five.load_state_dict(state)
    assert len(five) == 20 - 7 and "34 examples are seen twice" in caplog.text
    # A finished epoch stays finished; a state from before the world size was recorded loads
    # as this world's.
    done = sampler(1000, 64, 1)
    done.load_state_dict({**state, "batches_consumed": 8})
    assert len(done) == 0
    old = sampler(1000, 64, 1)
    old.load_state_dict({"epoch": 5, "batches_consumed": 3})
    assert len(old) == 16 - 3
    with pytest.raises(ValueError, match="out of range"):
        sampler(1000, 64, 1).load_state_dict({**state, "batches_consumed": 9})
