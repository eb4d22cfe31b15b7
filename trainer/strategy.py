"""A Lightning strategy for models whose embedding tables TorchRec shards (docs/architecture.md §5).

It is Lightning's DDP strategy (same launchers: Lightning's own, ``torchrun``, multi-node), except
that it never wraps the model in DDP: the LightningModule wraps its network in TorchRec's
``DistributedModelParallel`` in ``configure_model``, and DMP data-parallelises the dense part
itself. Checkpoints are sharded directories (:mod:`recforge.trainer.checkpoint`), local or on
``s3://`` object storage.

The LightningModule must provide ``sharded_state_dict()``, ``load_sharded_state_dict(state)``,
``fused_optimizer`` and ``sharding_plan()`` (see
:class:`recforge.trainer.sasrec_module.SASRecModule`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn

from recforge.trainer import checkpoint as ckpt

log = logging.getLogger(__name__)


LAUNCHER_PID = "RECFORGE_LAUNCHER_PID"
"""Set by recforge's launcher for the ranks it starts: the pid of rank 0, their parent."""


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return state not in ("Z", "X")  # a zombie has died, its parent has not reaped it yet


class PeerWatch:
    """Notices a rank that died, names it, and ends this one instead of letting it wait.

    A dead peer usually surfaces at once as a gloo error in the next collective ("Connection
    reset by peer"); :func:`peer_failure` turns that into the dead rank's name. What it covers
    besides is the wait that no collective ends: a rank started by Lightning's launcher whose
    rank 0 (its parent, hosting the rendezvous store) died before or between collectives.

    - Rank 0 of recforge's launcher polls the ranks it started: one killed by a signal ends the
      job at once (``rank 1 died (SIGKILL)``); one that exited with an error code gets
      ``grace_s`` to let rank 0 fail alike and print its own error first.
    - A rank it started watches its parent, while a trainer stage runs, and ends itself
      ``grace_s`` after the parent disappeared if nothing else has ended it.
    - Under torchrun the elastic agent does this (it stops the other workers and names the
      failed rank); :func:`peer_failure` then names a dead peer on this host from the pids the
      ranks exchanged at setup.
    """

    def __init__(self) -> None:
        self.rank = 0
        self.grace_s = 60.0
        self.children: list[subprocess.Popen] = []
        self.parent_pid: int | None = None
        self.peers: dict[int, tuple[str, int]] = {}
        self.active = False
        self._thread: threading.Thread | None = None
        self._parent_lost_at: float | None = None
        self._child_failed_at: float | None = None
        self._exit: Callable[[int], Any] = os._exit

    def start(self) -> None:
        if self._thread is None and (self.children or self.parent_pid is not None):
            self._thread = threading.Thread(
                target=self._run, name="recforge-peer-watch", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(0.5)
            try:
                self._check()
            except Exception:  # never let the watch itself take the rank down
                log.debug("peer watch failed", exc_info=True)

    def _check(self) -> None:
        now = time.monotonic()
        for index, proc in enumerate(self.children, start=1):
            code = proc.poll()
            if code is None or code == 0:
                continue
            if code < 0:
                self._stop(f"rank {index} died ({_describe_exit(code)})")
            self._child_failed_at = self._child_failed_at or now
            if now - self._child_failed_at >= self.grace_s:
                self._stop(f"rank {index} failed ({_describe_exit(code)}) and this rank did not")
        if self.parent_pid is not None and self.active:
            if os.getppid() != self.parent_pid or not _pid_alive(self.parent_pid):
                self._parent_lost_at = self._parent_lost_at or now
                if now - self._parent_lost_at >= self.grace_s:
                    self._stop(
                        f"lost contact with rank 0 (pid {self.parent_pid}, which started this "
                        f"rank, has exited; no word from it for {self.grace_s:.0f} s)"
                    )

    def diagnose(self, wait_s: float = 2.0) -> str | None:
        """The dead rank, if this process can tell: after a collective failed, the peer's exit
        may take a moment to show."""
        deadline = time.monotonic() + wait_s
        while True:
            for index, proc in enumerate(self.children, start=1):
                code = proc.poll()
                if code is not None and code != 0:
                    return f"rank {index} died ({_describe_exit(code)})"
            if self.parent_pid is not None and (
                os.getppid() != self.parent_pid or not _pid_alive(self.parent_pid)
            ):
                return f"rank 0 (pid {self.parent_pid}) died"
            host = socket.gethostname()
            for rank, (peer_host, pid) in sorted(self.peers.items()):
                if rank != self.rank and peer_host == host and not _pid_alive(pid):
                    return f"rank {rank} (pid {pid}) died"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def _stop(self, reason: str) -> None:
        others = [p for p in self.children if p.poll() is None]
        for proc in others:
            proc.send_signal(signal.SIGKILL)  # as Lightning's own observer does
        stopped = f"stopping rank {self.rank}" + (" and the other ranks" if others else "")
        sys.stderr.write(f"recforge: error: {reason}; {stopped} rather than wait for it\n")
        sys.stderr.flush()
        self._exit(1)


WATCH = PeerWatch()
"""This process's watch (one per process: its ranks' lifetimes are the process's)."""


def in_process_group() -> bool:
    """Whether this process has joined a process group (and so has gloo or NCCL threads)."""
    return dist.is_available() and dist.is_initialized()


def exit_failed_rank(code: int) -> int:
    """End a rank whose command failed with ``code`` at once, if it joined a process group;
    else return ``code``.

    A rank that raises right after a collective (every rank raises the same planning or
    checkpoint error) can reach interpreter finalization while gloo's worker thread still
    releases that collective's tensors; the thread then needs the GIL, cannot have it, and the
    process aborts ("terminate called without an active exception", SIGABRT instead of the exit
    code): measured on about one run in three of a plan that does not fit, with
    ``destroy_process_group`` first making no difference. The error has been printed and the
    trainer torn down (Lightning's ``on_exception`` hooks, loggers marked failed); what is left
    is to flush and leave without finalization.
    """
    if not in_process_group():
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def peer_failure(exc: BaseException) -> str | None:
    """One line for an error that says a peer rank is gone (a collective's connection reset or
    closed, a timed-out collective), naming the rank where it can be known; None for any other
    error."""
    text = str(exc)
    markers = (
        "Connection reset by peer",
        "Connection closed by peer",
        "Broken pipe",
        "Socket Timeout",
        "Timed out",
        "timed out",
        "Connection refused",
    )
    distributed = isinstance(exc, (dist.DistError, RuntimeError)) and (
        "gloo" in text or "c10d" in text or "nccl" in text.lower() or "Store" in text
    )
    if not distributed or not any(m in text for m in markers):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    detail = first.split("] ", 1)[-1].split(". This is typically", 1)[0][:200]
    dead = WATCH.diagnose()
    if dead:
        return f"{dead}; rank {WATCH.rank} lost contact with it ({detail})"
    return (
        f"rank {WATCH.rank} lost contact with another rank ({detail}); the launcher's report "
        "names the rank that failed"
    )


class _WatchedLauncher(_SubprocessScriptLauncher):
    """Lightning's launcher (rank 0 re-runs the command for the other local ranks), with
    :class:`PeerWatch` instead of Lightning's observer, which SIGKILLs rank 0 without a word
    up to 5 s after a rank died."""

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(
            num_devices=self.num_processes, num_nodes=self.num_nodes
        )
        if not self.cluster_environment.creates_processes_externally:
            os.environ[LAUNCHER_PID] = str(os.getpid())
            self._call_children_scripts()
            WATCH.children = self.procs
            WATCH.start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


class TorchRecStrategy(DDPStrategy):
    """DDP launch and process groups, TorchRec DMP for the model, sharded checkpoints."""

    strategy_name = "torchrec"

    def __init__(
        self,
        process_group_backend: str | None = None,
        timeout_minutes: float = 30.0,
        start_method: str = "popen",
        reset_embedding_optimizer: bool = False,
        peer_timeout_seconds: float = 60.0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            process_group_backend: ``gloo`` or ``nccl``; default: nccl on CUDA, gloo on CPU.
            timeout_minutes: collective timeout.
            start_method: Lightning's launcher start method (``popen`` re-runs the command per
                rank).
            reset_embedding_optimizer: when resuming ``fit``, load the weights only and start
                the fused embedding optimizer afresh (for a plan whose optimizer state cannot be
                carried over; ``recforge fit --reset_embedding_optimizer true``).
            peer_timeout_seconds: how long a rank whose peer died may go on before
                :class:`PeerWatch` ends it (a rank killed by a signal ends the job at once;
                see docs/architecture.md §6).
        """
        super().__init__(
            process_group_backend=process_group_backend,
            timeout=timedelta(minutes=timeout_minutes),
            start_method=start_method,
            **kwargs,
        )
        self.reset_embedding_optimizer = reset_embedding_optimizer
        self.peer_timeout_seconds = peer_timeout_seconds

    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or (
            "nccl" if self.root_device.type == "cuda" else "gloo"
        )

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is _SubprocessScriptLauncher:
            self._launcher = _WatchedLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes
            )

    def setup_distributed(self) -> None:
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        if restart <= 0 or not agent_store or dist.is_initialized():
            super().setup_distributed()
            return
        # torchrun's static rendezvous (--master_port) keeps one TCPStore across restarts, so a
        # restarted attempt would read the failed attempt's gloo addresses under the same keys
        # and connect to dead sockets (measured: "connection refused" both ways). A prefix per
        # attempt gives each one a clean key space; c10d rendezvous makes a new store anyway.
        reset_seed()
        self.set_world_ranks()
        self._process_group_backend = self._get_process_group_backend()
        assert self.cluster_environment is not None
        store = dist.PrefixStore(
            f"recforge/attempt-{restart}/",
            dist.TCPStore(
                self.cluster_environment.main_address,
                self.cluster_environment.main_port,
                world_size=self.world_size,
                is_master=False,
                timeout=self._timeout,
            ),
        )
        dist.init_process_group(
            self._process_group_backend,
            store=store,
            rank=self.global_rank,
            world_size=self.world_size,
            timeout=self._timeout,
        )

    def setup_environment(self) -> None:
        WATCH.grace_s = self.peer_timeout_seconds
        launcher_pid = os.environ.get(LAUNCHER_PID)
        if launcher_pid and launcher_pid != str(os.getpid()) and launcher_pid == str(os.getppid()):
            WATCH.parent_pid = int(launcher_pid)  # a rank recforge's launcher started
        WATCH.active = True
        WATCH.start()  # before the process group: its rendezvous is one of the waits
        super().setup_environment()
        WATCH.rank = self.global_rank
        if dist.is_available() and dist.is_initialized() and self.world_size > 1:
            peers: list[Any] = [None] * self.world_size
            dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
            WATCH.peers = dict(enumerate(peers))
        if self.root_device.type == "cuda":
            # TF32 matmuls: ~free speed on Ampere+ for the dense part; embeddings are unaffected.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def setup(self, trainer: Any) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        # DMP has placed the shards and DDP-wrapped the dense part; no DDP wrapper here, and no
        # broadcast of "module states" from rank 0, which would overwrite other ranks' shards.
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def configure_ddp(self) -> None:  # never wrap: DMP already data-parallelises the dense part
        pass

    def teardown(self) -> None:
        # Between stages and at the end a rank 0 that exits first is no failure.
        WATCH.active = False
        super().teardown()

    # --- checkpoints ---

    def _info(self, message: str) -> None:
        # recforge's own logger: the CLI shows its INFO lines and quiets Lightning's.
        if self.is_global_zero:
            log.info(message)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return self.lightning_module.sharded_state_dict()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        module = self.lightning_module
        sharded = {"model": checkpoint["state_dict"]}
        if module.fused_optimizer is not None:
            sharded["fused_optimizer"] = module.fused_optimizer.state_dict()
        plan, plan_text = module.sharding_plan()
        ckpt.save(filepath, checkpoint, sharded, plan, plan_text, self.world_size)

    def load_checkpoint(
        self, checkpoint_path: Any, weights_only: bool | None = None
    ) -> dict[str, Any]:
        module = self.lightning_module
        state = ckpt.read_trainer_state(checkpoint_path)
        meta = state["recforge"]
        resuming = module.trainer.state.fn == TrainerFn.FITTING
        plan, _ = module.sharding_plan()
        reset = self.reset_embedding_optimizer
        if resuming:
            # Refuses what cannot be carried over; a world-size change alone reshards (DCP).
            changes = ckpt.check_plan(
                checkpoint_path,
                meta["plan"],
                plan,
                meta["world_size"],
                self.world_size,
                reset_embedding_optimizer=reset,
            )
            if changes:
                self._info(
                    f"resuming under another plan ({'; '.join(changes)}): the model is "
                    "resharded"
                    + ("" if reset else ", and the fused embedding optimizer state with it")
                )
            if reset and module.fused_optimizer is not None:
                self._info(
                    "reset_embedding_optimizer: loading the weights only; the fused embedding "
                    "optimizer starts with fresh state"
                )
        skeleton: dict[str, Any] = {"model": module.sharded_state_dict()}
        if resuming and not reset and module.fused_optimizer is not None:
            skeleton["fused_optimizer"] = module.fused_optimizer.state_dict()
        ckpt.load_sharded(checkpoint_path, skeleton, state)
        state["state_dict"] = skeleton["model"]
        if "fused_optimizer" in skeleton:
            state["fused_optimizer"] = skeleton["fused_optimizer"]
        self._info(
            f"loaded sharded checkpoint {checkpoint_path} (written by {meta['world_size']} rank(s))"
        )
        return state

    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        self.lightning_module.load_sharded_state_dict(checkpoint["state_dict"])

    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        super().load_optimizer_state_dict(checkpoint)
        fused = self.lightning_module.fused_optimizer
        if fused is not None and "fused_optimizer" in checkpoint:
            fused.load_state_dict(checkpoint["fused_optimizer"])

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            ckpt.remove(filepath)
