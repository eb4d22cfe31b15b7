"""Sharded checkpoints: a directory per checkpoint, written with ``torch.distributed.checkpoint``.

Layout of ``<name>.ckpt/``:

- DCP files (``.metadata``, ``__<rank>_0.distcp``): the model state (sharded embedding tables as
  ``ShardedTensor``s, dense weights) and the fused embedding optimizer state, each rank writing
  its own shards;
- ``trainer_state.pt``: everything else Lightning keeps (loops, callbacks, dense optimizer,
  schedulers, hyper-parameters) plus ``recforge`` metadata: the sharding plan and world size;
- ``sharding_plan.txt``: the plan, for people.

A local checkpoint is written into a hidden ``.partial-<hash>`` sibling and renamed when every
rank has finished, so a crash never leaves a directory that looks complete (nor one whose name
Lightning's ``ckpt_path="last"`` lookup would pick up).

A checkpoint on object storage (``s3://bucket/prefix/<name>.ckpt``, :mod:`recforge.data.storage`)
cannot be renamed into place, so there ``trainer_state.pt`` is the commit: the DCP files go under
a fresh generation prefix, ``<name>.ckpt/shards-<token>/``, and ``trainer_state.pt``, which names
that generation, is written last, by rank 0, once every rank's shards are written. A single PUT
replaces an object whole, so readers see the previous checkpoint until that moment and the new
one after it; rank 0 then deletes the other generations. Overwriting ``last.ckpt`` this way never
leaves a window without a resumable ``last.ckpt``, which deleting the old objects first would
(a crash between the delete and the commit loses the resume point of a long run). A crash before
the commit leaves an orphan generation that nothing reads and the next save of that name
deletes. Without ``trainer_state.pt`` a prefix is an incomplete checkpoint, and removal deletes
it first for the same reason.

Resuming training reshards the model and the fused optimizer state to the current world size as
long as every table keeps its sharding type (:func:`check_plan`: fused optimizer state is laid out
per sharding type, torchrec issue 2394); loading weights for validation/test reshards to any
plan.
"""

from __future__ import annotations

import hashlib
import io
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from recforge.atomic import replace_directory
from recforge.data import storage

CHECKPOINT_FORMAT = 1
TRAINER_STATE = "trainer_state.pt"
PLAN_TEXT = "sharding_plan.txt"
SHARDS_PREFIX = "shards-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, incomplete, corrupt, or from another plan) or
    written.

    ``every_rank``: raised alike on every rank (a collective outcome), so one rank says it."""

    def __init__(self, message: str, *, every_rank: bool = False) -> None:
        super().__init__(message)
        self.every_rank = every_rank


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _shared_token() -> str:
    """A random token that every rank agrees on (rank 0's)."""
    token = [secrets.token_hex(6) if _rank() == 0 else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return str(token[0])


def _storage_failure(uri: str, exc: storage.StorageError) -> CheckpointError:
    # StorageError is a DataError, which `recforge fit` does not turn into a one-line exit 2.
    return CheckpointError(f"checkpoint {uri}: {exc.message}")


def check_directory(location: str | Path) -> None:
    """Fail early, in one line naming ``location``, when checkpoints cannot be written there
    (missing bucket, unreachable endpoint, no access); local directories always pass."""
    try:
        storage.check_reachable(location)
    except storage.StorageError as exc:
        raise CheckpointError(f"checkpoint directory {location}: {exc.message}") from None


def save(
    path: str | Path,
    checkpoint: dict[str, Any],
    sharded_state: dict[str, Any],
    plan: dict[str, Any],
    plan_text: str,
    world_size: int,
) -> None:
    """Collective: every rank calls it with its own shards."""
    meta = {"format": CHECKPOINT_FORMAT, "plan": plan, "world_size": world_size}
    rest = {k: v for k, v in checkpoint.items() if k != "state_dict"}
    if storage.is_remote(path):
        _save_remote(str(path).rstrip("/"), rest, meta, sharded_state, plan_text)
        return
    path = Path(path)
    tag = hashlib.sha1(path.name.encode()).hexdigest()[:12]
    tmp = path.with_name(f".partial-{tag}")
    # A failed write (disk full, quota, file size limit) must reach every rank as the same
    # CheckpointError: a rank left waiting in a barrier for one that raised would hang (or die
    # of the lost connection with a traceback). So rank 0's own steps report their outcome in a
    # broadcast, and DCP already raises its failures on every rank.
    failure = None
    if _rank() == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as exc:
            failure = _os_failure(exc)
    _raise_if_failed(path, tmp, _shared_outcome(failure))
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.save(sharded_state, checkpoint_id=str(tmp))
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        failure = _first_failure(exc)
    else:
        failure = None
    if failure is not None:  # every rank has it
        _raise_if_failed(path, tmp, failure)
    if _rank() == 0:
        rest["recforge"] = meta
        try:
            # Serialised first, then written with Python's own I/O, so a full disk is an OSError
            # naming the file and errno rather than torch's "file write failed".
            buffer = io.BytesIO()
            torch.save(rest, buffer)
            (tmp / TRAINER_STATE).write_bytes(buffer.getbuffer())
            (tmp / PLAN_TEXT).write_text(plan_text)
            # Not atomic_directory: every rank writes into the one temp dir, so its name is
            # derived from the target (no pid or random part) and only rank 0 creates and
            # renames it.
            replace_directory(tmp, path, aside=path.with_name(f".old-{tag}"))
        except OSError as exc:
            failure = _os_failure(exc)
    _raise_if_failed(path, tmp, _shared_outcome(failure))


def _os_failure(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{type(exc).__name__}: [Errno {exc.errno}] {exc.strerror or exc}{where}"


def _shared_outcome(failure: str | None) -> str | None:
    """Rank 0's ``failure`` (None: success) on every rank; also the barrier after its step."""
    outcome = [failure]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(outcome, src=0)
    return outcome[0]


def _raise_if_failed(path: Path, tmp: Path, failure: str | None) -> None:
    """Collective: every rank raises the same CheckpointError, after rank 0 removed the
    partial directory; the checkpoint at ``path`` (if any) is untouched."""
    if failure is None:
        return
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(
        f"checkpoint {path} could not be written ({failure}); "
        + ("the previous one is intact" if path.exists() else "there is no previous one")
        + " and no partial directory is left",
        every_rank=True,
    )


def _save_remote(
    uri: str,
    rest: dict[str, Any],
    meta: dict[str, Any],
    sharded_state: dict[str, Any],
    plan_text: str,
) -> None:
    # Not exported from torch.distributed.checkpoint itself in torch 2.13.
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
    from torch.distributed.checkpoint.api import CheckpointException

    generation = SHARDS_PREFIX + _shared_token()
    # sync_files would fall back to os.sync() of the whole host for each object stream.
    writer = FsspecWriter(
        storage.join(uri, generation), sync_files=False, **storage.storage_options()
    )
    try:
        dcp.save(sharded_state, storage_writer=writer)
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        raise CheckpointError(
            f"checkpoint {uri}: writing the sharded state failed ({_first_failure(exc)})",
            every_rank=True,  # DCP raises its failures on every rank
        ) from None
    # Every rank's shards are stored before the commit below can make them visible.
    _barrier()
    failure = None
    if _rank() == 0:
        rest["recforge"] = {**meta, "shards": generation}
        buffer = io.BytesIO()
        torch.save(rest, buffer)
        try:
            storage.write_bytes(storage.join(uri, PLAN_TEXT), plan_text.encode())
            storage.write_bytes(storage.join(uri, TRAINER_STATE), buffer.getvalue())  # commit
            for name in storage.list_names(uri):
                if name.startswith(SHARDS_PREFIX) and name != generation:
                    storage.delete_directory(storage.join(uri, name))
        except storage.StorageError as exc:
            failure = str(_storage_failure(uri, exc))
        except OSError as exc:  # pyarrow's own, from deleting a replaced generation
            failure = (
                f"checkpoint {uri}: written, but a replaced generation could not be deleted "
                f"({str(exc).strip().splitlines()[0][:300]})"
            )
    # Rank 0's outcome reaches every rank (no rank left waiting in a barrier for one that raised).
    failure = _shared_outcome(failure)
    if failure is not None:
        raise CheckpointError(failure, every_rank=True)


def _first_failure(exc: BaseException) -> str:
    """``Type: first line`` of a DCP failure; a CheckpointException carries each rank's
    failure, and the first one says more than the wrapper."""
    from torch.distributed.checkpoint.api import CheckpointException

    message = str(exc).strip().splitlines()
    if isinstance(exc, CheckpointException):
        failure = next(iter(exc.failures.values()), None)
        if isinstance(failure, tuple):  # (exception, traceback)
            failure = failure[0]
        if failure is not None:
            lines = str(failure).strip().splitlines()
            message = [f"{type(failure).__name__}: {lines[0] if lines else ''}"]
    detail = next(
        (line for line in message if "Error" in line or "Missing" in line),
        message[0] if message else "",
    )
    return f"{type(exc).__name__}: {detail[:300]}"


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    if storage.is_remote(path):
        return _read_remote_trainer_state(str(path).rstrip("/"))
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
    return _check_state(path, state_file.read_bytes())


def _read_remote_trainer_state(uri: str) -> dict[str, Any]:
    try:
        storage.check_reachable(uri)
        try:
            data = storage.read_bytes(storage.join(uri, TRAINER_STATE))
        except FileNotFoundError:
            if storage.exists(uri):
                raise CheckpointError(
                    f"checkpoint {uri} is incomplete: {TRAINER_STATE} is missing (it is written "
                    "last, so the save was interrupted or the checkpoint is being removed)"
                ) from None
            raise CheckpointError(f"checkpoint {uri} does not exist") from None
        state = _check_state(uri, data)
        if not storage.exists(storage.join(shards_location(uri, state), ".metadata")):
            raise CheckpointError(f"checkpoint {uri} is incomplete: .metadata is missing")
    except storage.StorageError as exc:
        raise _storage_failure(uri, exc) from None
    return state


def _check_state(path: str | Path, data: bytes) -> dict[str, Any]:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
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


def shards_location(path: str | Path, state: dict[str, Any] | None) -> str:
    """Where the DCP files of the checkpoint whose trainer state is ``state`` are: the
    directory itself, or the generation its trainer state names (object storage)."""
    generation = ((state or {}).get("recforge") or {}).get("shards")
    return storage.join(path, generation) if generation else str(path)


def dcp_source(path: str | Path, state: dict[str, Any] | None) -> dict[str, Any]:
    """``dcp.load`` keyword arguments that read the shards of a local or remote checkpoint."""
    location = shards_location(path, state)
    if not storage.is_remote(location):
        return {"checkpoint_id": location}
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    # Only the reader: a checkpoint_id beside it would re-init the reader without the options.
    return {"storage_reader": FsspecReader(location, **storage.storage_options())}


RESHARDABLE = ("row_wise", "table_wise", "data_parallel")
"""Sharding types whose fused optimizer state DCP reshards to any world size: a row-wise or
table-wise table's state (e.g. rowwise_adagrad's ``momentum1``, one value per row) is a
``ShardedTensor`` over the whole table's rows, saved and loaded by global row offset, so per-row
state moves with its rows; a data-parallel table's state is replicated. Column-wise and
table-row-wise state is laid out per shard (torchrec issue 2394), so it is only carried when the
shards keep their offsets and sizes."""


def _geometry(entry: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    return sorted((list(s["offsets"]), list(s["sizes"])) for s in entry.get("shards") or [])


def check_plan(
    path: str | Path,
    saved: dict[str, Any],
    current: dict[str, Any],
    saved_world: int,
    current_world: int,
    *,
    reset_embedding_optimizer: bool = False,
) -> list[str]:
    """Check that training can resume from a checkpoint written under ``saved`` (plan summary)
    and ``saved_world`` ranks under ``current`` and ``current_world``; return the changes, one
    line each, for the log.

    A world-size change is fine when every table keeps its sharding type and compute kernel and
    that type's optimizer state reshards (:data:`RESHARDABLE`, or the same shard geometry). Any
    other change to a table's sharding is refused, naming the table and why, unless
    ``reset_embedding_optimizer`` (the fused optimizer state is then not loaded). A table that
    exists on one side only is always refused: its weights cannot load either.
    """
    changes = []
    if saved_world != current_world:
        changes.append(f"world size {saved_world} -> {current_world}")

    def desc(p: dict[str, Any] | None) -> str:
        return "absent" if p is None else f"{p['sharding_type']} on ranks {p['ranks']}"

    refused, missing = [], []
    for table in sorted(set(saved) | set(current)):
        a, b = saved.get(table), current.get(table)
        if a == b:
            continue
        change = f"table {table}: {desc(a)} -> {desc(b)}"
        changes.append(change)
        if a is None or b is None:
            where = "the model has no such table" if b is None else "the checkpoint lacks it"
            missing.append(f"{change} ({where})")
        elif a["sharding_type"] != b["sharding_type"]:
            refused.append(
                f"{change} (the sharding type changed, and the fused optimizer state is laid "
                "out per sharding type)"
            )
        elif a.get("compute_kernel") != b.get("compute_kernel"):
            refused.append(
                f"{change} (compute kernel {a.get('compute_kernel')} -> "
                f"{b.get('compute_kernel')}: the kernel holds the fused optimizer state)"
            )
        elif b["sharding_type"] not in RESHARDABLE and _geometry(a) != _geometry(b):
            refused.append(
                f"{change} ({b['sharding_type']} optimizer state is laid out per shard and the "
                "shards changed, so it does not reshard)"
            )
    if missing:
        raise CheckpointError(
            f"checkpoint {path} was written for other embedding tables ({'; '.join(missing)}): "
            "it is from another model or config"
        )
    if refused and not reset_embedding_optimizer:
        raise CheckpointError(
            f"checkpoint {path} was written under another sharding plan whose fused embedding "
            f"optimizer state cannot be carried over ({'; '.join(refused)}). A world-size change "
            f"alone is fine for {', '.join(RESHARDABLE)} tables. Resume with the same sharding "
            "config, or pass --reset_embedding_optimizer true to resume from these weights with "
            "fresh fused optimizer state (validate/test reshard freely)"
        )
    return changes


def load_sharded(
    path: str | Path, skeleton: dict[str, Any], state: dict[str, Any] | None = None
) -> None:
    """Collective: fill ``skeleton`` (this rank's current shards) in place from the checkpoint
    whose trainer state (:func:`read_trainer_state`) is ``state``."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(skeleton, **dcp_source(path, state))
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        raise CheckpointError(
            f"checkpoint {path}: the sharded state does not load ({_first_failure(exc)}); "
            "it is corrupt or from another model/config"
        ) from None


def remove(path: str | Path) -> None:
    if storage.is_remote(path):
        uri = str(path).rstrip("/")
        try:
            # The commit first: a removal cut short leaves an incomplete checkpoint, never a
            # complete-looking one with shards missing.
            storage.delete_file(storage.join(uri, TRAINER_STATE))
            storage.delete_directory(uri)
        except storage.StorageError as exc:
            raise _storage_failure(uri, exc) from None
        except OSError as exc:  # pyarrow's own, from listing the prefix
            raise CheckpointError(
                f"checkpoint {uri}: cannot delete it ({str(exc).strip().splitlines()[0][:300]})"
            ) from None
        return
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
