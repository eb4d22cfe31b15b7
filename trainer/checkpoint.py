"""Sharded checkpoints: a directory per checkpoint, written with ``torch.distributed.checkpoint``.

Layout of ``<name>.ckpt/``:

- DCP files (``.metadata``, ``__<rank>_0.distcp``): the model state (sharded embedding tables as
  ``ShardedTensor``s, dense weights) and the fused embedding optimizer state, each rank writing
  its own shards;
- ``trainer_state.pt``: everything else Lightning keeps (loops, callbacks, dense optimizer,
  schedulers, hyper-parameters) plus ``recforge`` metadata: the sharding plan and world size;
- ``sharding_plan.txt``: the plan, for people.

A checkpoint is written into a hidden ``.partial-<hash>`` sibling and renamed when every rank has
finished, so a crash never leaves a directory that looks complete (nor one whose name Lightning's
``ckpt_path="last"`` lookup would pick up). Resuming training requires the plan it was
written with (fused optimizer state is laid out per sharding type, torchrec issue 2394); loading
weights for validation/test reshards to the current plan.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from recforge.atomic import replace_directory

CHECKPOINT_FORMAT = 1
TRAINER_STATE = "trainer_state.pt"
PLAN_TEXT = "sharding_plan.txt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, incomplete, corrupt, or from another plan."""


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save(
    path: str | Path,
    checkpoint: dict[str, Any],
    sharded_state: dict[str, Any],
    plan: dict[str, Any],
    plan_text: str,
    world_size: int,
) -> None:
    """Collective: every rank calls it with its own shards."""
    path = Path(path)
    tag = hashlib.sha1(path.name.encode()).hexdigest()[:12]
    tmp = path.with_name(f".partial-{tag}")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(sharded_state, checkpoint_id=str(tmp))
    if _rank() == 0:
        rest = {k: v for k, v in checkpoint.items() if k != "state_dict"}
        rest["recforge"] = {"format": CHECKPOINT_FORMAT, "plan": plan, "world_size": world_size}
        torch.save(rest, tmp / TRAINER_STATE)
        (tmp / PLAN_TEXT).write_text(plan_text)
        # Not atomic_directory: every rank writes into the one temp dir, so its name is derived
        # from the target (no pid or random part) and only rank 0 creates and renames it.
        replace_directory(tmp, path, aside=path.with_name(f".old-{tag}"))
    _barrier()


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a file; recforge checkpoints are directories written by "
            "`recforge fit` (a sharded torch.distributed.checkpoint)"
        )
    state_file = path / TRAINER_STATE
    if not state_file.is_file() or not (path / ".metadata").is_file():
        missing = TRAINER_STATE if not state_file.is_file() else ".metadata"
        raise CheckpointError(f"checkpoint {path} is incomplete: {missing} is missing")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch.load raises many types on a damaged file
        raise CheckpointError(
            f"checkpoint {path}: cannot read {TRAINER_STATE} ({type(exc).__name__}: "
            f"{str(exc)[:200]}); the file is corrupt"
        ) from None
    meta = state.get("recforge") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} was not written by this version of recforge "
            f"(format {meta.get('format') if isinstance(meta, dict) else None!r}, "
            f"expected {CHECKPOINT_FORMAT})"
        )
    return state


def check_plan(
    path: str | Path,
    saved: dict[str, Any],
    current: dict[str, Any],
    saved_world: int,
    current_world: int,
) -> None:
    """Refuse to resume training under a different sharding plan."""
    if saved == current and saved_world == current_world:
        return
    diffs = []
    if saved_world != current_world:
        diffs.append(f"world size {saved_world} -> {current_world}")

    def desc(p: dict[str, Any] | None) -> str:
        return "absent" if p is None else f"{p['sharding_type']} on ranks {p['ranks']}"

    for table in sorted(set(saved) | set(current)):
        a, b = saved.get(table), current.get(table)
        if a != b:
            diffs.append(f"table {table}: {desc(a)} -> {desc(b)}")
    raise CheckpointError(
        f"checkpoint {path} was written under another sharding plan ({'; '.join(diffs)}). "
        "The fused optimizer state is laid out per sharding type, so training cannot resume "
        "under a new plan: resume with the same devices and sharding config, or start a new run "
        "from these weights (validate/test reshard freely)"
    )


def load_sharded(path: str | Path, skeleton: dict[str, Any]) -> None:
    """Collective: fill ``skeleton`` (this rank's current shards) in place from the checkpoint."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(skeleton, checkpoint_id=str(path))
    except (
        Exception,
        CheckpointException,
    ) as exc:  # CheckpointException derives from BaseException
        message = str(exc).strip().splitlines()
        if isinstance(exc, CheckpointException):
            # It carries the failure of each rank; name the first one.
            failure = next(iter(exc.failures.values()), None)
            if isinstance(failure, tuple):  # (exception, traceback)
                failure = failure[0]
            if failure is not None:
                message = [f"{type(failure).__name__}: {str(failure).strip().splitlines()[0]}"]
        detail = next(
            (line for line in message if "Error" in line or "Missing" in line),
            message[0] if message else "",
        )
        raise CheckpointError(
            f"checkpoint {path}: the sharded state does not load ({type(exc).__name__}: "
            f"{detail[:300]}); it is corrupt or from another model/config"
        ) from None


def remove(path: str | Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
