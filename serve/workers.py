"""`recforge serve --workers N`: N processes on one port, and hot reloads that reach all of them
(docs/architecture.md §10).

The parent process loads no model: it reserves the port, starts N workers (``spawn``, so none
inherits another's onnxruntime state) and restarts any that dies. Each worker binds its own
listening socket with ``SO_REUSEPORT``, so the kernel spreads connections over them, and loads
the artifact once; ``item_embeddings.npy`` is memory-mapped read-only, so its pages are shared
by all workers (and the page cache), not copied N times.

Reload across workers, in two phases so that all switch at once (:mod:`recforge.serve.holder`).
A small state directory holds ``state.json`` (the newest ``generation`` and its ``source``, the
``served`` generation and source, and the last ``aborted`` generation), changed under an
``flock`` and replaced atomically (write, then rename), and ``commit``, an 8-byte word every
worker maps: the generation to serve. A reload (``POST /v1/admin/reload`` to any worker, or
SIGHUP to the parent or a worker) takes the cluster's reload lock (one reload at a time) and
publishes a new generation; each worker watches ``state.json`` (a ``stat`` every 50 ms), loads
and stages the new model and acknowledges in ``acks/<pid>`` (generation, model sha256, ok). The
worker that took the HTTP reload loads first (a refused artifact is a 409 and nothing is
published). When every worker has staged it, the coordinator writes the generation into
``commit``: every request that starts after that, in any worker, is served by the new model.
If a worker could not load it, or one did not answer within ``ACK_TIMEOUT_S``, the generation
is aborted: every worker keeps the old model, and the HTTP reload answers 409. A worker started
later (one replacing a dead one) loads the ``served`` source.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import mmap
import multiprocessing
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recforge.artifact import MODEL

log = logging.getLogger(__name__)

STATE, LOCK, RELOAD_LOCK, ACKS, COMMIT = "state.json", "state.lock", "reload.lock", "acks", "commit"
POLL_S = 0.05
ACK_TIMEOUT_S = 300.0  # a worker loads the artifact itself; a large one takes minutes
WORD = struct.Struct("<q")


class Cluster:
    """One process's view of the shared reload state (workers and the parent)."""

    def __init__(self, directory: str | os.PathLike, workers: int, name: str = "") -> None:
        self.directory, self.workers = Path(directory), workers
        self.name = name or str(os.getpid())  # its acknowledgement's file name
        self.generation = -1  # the newest generation this worker has loaded (or tried to)
        self._lock = threading.Lock()  # one reload at a time in this worker
        self._word: mmap.mmap | None = None

    @classmethod
    def create(cls, source: str, workers: int) -> Cluster:
        cluster = cls(tempfile.mkdtemp(prefix="recforge-serve-"), workers)
        (cluster.directory / ACKS).mkdir()
        (cluster.directory / COMMIT).write_bytes(WORD.pack(0))
        cluster._write({"generation": 0, "source": source, "served": [0, source], "aborted": -1})
        return cluster

    def state(self) -> dict[str, Any]:
        return json.loads((self.directory / STATE).read_text())

    def served_source(self) -> str:
        """The source to load at a worker's start; :meth:`start` follows on from its generation."""
        self.generation, source = self.state()["served"]
        return source

    def committed(self) -> int:
        """The generation to serve; read on every request, so a mapped word, not a file read.
        Written with one aligned 8-byte store; a reader compares it with what it staged."""
        if self._word is None:
            with open(self.directory / COMMIT, "rb") as f:
                self._word = mmap.mmap(f.fileno(), WORD.size, access=mmap.ACCESS_READ)
        return WORD.unpack_from(self._word)[0]

    def publish(self, source: str) -> int:
        """A new generation serving ``source``; returns its number."""
        with self._state_lock():
            state = self.state()
            state["generation"] += 1
            state["source"] = source
            self._write(state)
        return state["generation"]

    def coordinate(self, generation: int) -> None:
        """Once every worker has staged ``generation``, commit it; else abort it and raise."""
        acks = self.wait(generation)
        failed = [name for name, ack in acks.items() if not ack["ok"]]
        if len(acks) < self.workers or failed:
            with self._state_lock():
                state = self.state()
                state["aborted"] = generation
                self._write(state)
            raise OSError(
                f"the new model was loaded by {len(acks) - len(failed)} of {self.workers} "
                f"workers (failed: {failed or 'none'}; see the server log); every worker still "
                "serves the old one"
            )
        with self._state_lock():
            state = self.state()
            fd = os.open(self.directory / COMMIT, os.O_WRONLY)
            try:
                os.pwrite(fd, WORD.pack(generation), 0)  # the switch, for every worker at once
            finally:
                os.close(fd)
            state["served"] = [generation, state["source"]]
            self._write(state)

    @contextlib.contextmanager
    def reloading(self) -> Iterator[None]:
        """The cluster's reload lock: one reload at a time, whichever process coordinates it."""
        with open(self.directory / RELOAD_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    @contextlib.contextmanager
    def _state_lock(self) -> Iterator[None]:
        with open(self.directory / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # read-modify-write by one process at a time
            yield

    def _write(self, state: dict[str, Any]) -> None:
        tmp = self.directory / f".{STATE}.{os.getpid()}"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.directory / STATE)  # readers see the old file or the new, whole

    # --- in a worker ---

    def start(self, holder: Any) -> None:
        """Serve ``holder`` (loaded from :meth:`served_source`) and follow the reloads."""
        holder.committed = self.committed  # self.generation: the one served_source() gave
        self._ack(holder, ok=True)
        threading.Thread(target=self._watch, args=(holder,), daemon=True).start()

    def reload(self, holder: Any, source: str | None) -> Any:
        """Load here first (raises: nothing published), publish, commit once all have it."""
        with self.reloading():
            with self._lock:
                source = source or holder.source
                model = holder.load(source)
                self.generation = self.publish(source)
                holder.stage(self.generation, source, model)
                self._ack(holder, ok=True)
            try:
                self.coordinate(self.generation)
            except OSError:
                holder.discard(self.generation)
                raise
        holder.current  # noqa: B018  (promotes it now, so the answer's reload count is exact)
        return model

    def wait(self, generation: int, timeout_s: float = ACK_TIMEOUT_S) -> dict[str, dict]:
        """The acknowledgements of ``generation`` (or a later one), once all workers gave one."""
        deadline = time.monotonic() + timeout_s
        while True:
            acks = {}
            for path in (self.directory / ACKS).iterdir():
                if path.name.startswith("."):
                    continue  # being written
                try:
                    ack = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue  # replaced or removed under us: read again next round
                if ack["generation"] >= generation:
                    acks[path.name] = ack
            if len(acks) >= self.workers or time.monotonic() > deadline:
                return acks
            time.sleep(POLL_S / 2)

    def _ack(self, holder: Any, ok: bool) -> None:
        ack = {
            "generation": self.generation,
            "sha256": holder.staged_sha() or holder.current.manifest["files"][MODEL][:12],
            "ok": ok,
        }
        tmp = self.directory / ACKS / f".{self.name}"
        tmp.write_text(json.dumps(ack))
        os.replace(tmp, self.directory / ACKS / self.name)

    def _watch(self, holder: Any) -> None:
        path, seen = self.directory / STATE, None
        while True:
            time.sleep(POLL_S)
            try:
                stamp = path.stat().st_mtime_ns, path.stat().st_ino
                if stamp == seen:
                    continue
                seen = stamp
                state = self.state()
            except (OSError, ValueError):
                continue  # the parent removed the directory (shutdown), or a torn read
            holder.current  # noqa: B018  (a committed model is promoted even with no request)
            with self._lock:
                generation = state["generation"]
                if state["aborted"] >= 0:
                    holder.discard(state["aborted"])
                if generation <= self.generation or state["aborted"] == generation:
                    continue  # this worker published it, already followed it, or it was aborted
                self.generation = generation
                try:
                    holder.stage(generation, state["source"], holder.load(state["source"]))
                    ok = True
                except Exception as exc:
                    ok = False
                    log.error(
                        "worker %d: cannot load %s, the reload will be aborted: %s",
                        os.getpid(),
                        state["source"],
                        exc,
                    )
                self._ack(holder, ok)


# --- the parent ---


def serve_workers(args: Any, workers: int, serve_one: Any) -> int:
    """Run ``workers`` processes of ``serve_one(args, cluster_dir)`` on one port until SIGTERM or
    SIGINT; SIGHUP reloads them all."""
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    reserved = socket.socket(family, socket.SOCK_STREAM)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:  # bound, never listening: fails now if the port is taken, and keeps it ours
        reserved.bind((args.host, args.port))
    except OSError as exc:
        print(f"recforge serve: error: cannot bind {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    cluster = Cluster.create(args.source, workers)
    context = multiprocessing.get_context("spawn")
    options = {k: v for k, v in vars(args).items() if k != "func"}
    stop = threading.Event()

    def start() -> Any:
        proc = context.Process(target=serve_one, args=(options, str(cluster.directory), workers))
        proc.start()
        return proc

    def reload_all() -> None:
        with cluster.reloading():
            generation = cluster.publish(cluster.served_source())
            log.warning("SIGHUP: reloading every worker (generation %d)", generation)
            try:
                cluster.coordinate(generation)
            except OSError as exc:
                log.error("SIGHUP: reload aborted: %s", exc)

    def on_hup(signum: int, frame: Any) -> None:
        threading.Thread(target=reload_all, daemon=True).start()

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    procs = [start() for _ in range(workers)]
    print(
        f"serving {args.source} on http://{args.host}:{args.port} with {workers} workers "
        "(docs: /docs)",
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            for i, proc in enumerate(procs):
                if not proc.is_alive():
                    log.error(
                        "worker %d exited (code %s); starting another", proc.pid, proc.exitcode
                    )
                    (cluster.directory / ACKS / str(proc.pid)).unlink(missing_ok=True)
                    procs[i] = start()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: uvicorn finishes the requests in flight
        for proc in procs:
            proc.join(timeout=20)
            if proc.is_alive():
                proc.kill()
        reserved.close()
        shutil.rmtree(cluster.directory, ignore_errors=True)
    return 0


def listening_socket(host: str, port: int) -> socket.socket:
    """A worker's own listening socket on the shared port (``SO_REUSEPORT``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (with
    # proto 0, Nagle and delayed ACKs added ~40 ms to every response).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
