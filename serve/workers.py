"""`recforge serve --workers N`: N processes on one port, and hot reloads that reach all of them
(docs/architecture.md §10).

The parent process loads no model: it reserves the port, starts N workers (``spawn``, so none
inherits another's onnxruntime state) and restarts any that dies. Each worker binds its own
listening socket with ``SO_REUSEPORT``, so the kernel spreads connections over them, and loads
the artifact once; ``item_embeddings.npy`` is memory-mapped read-only, so its pages are shared
by all workers (and the page cache), not copied N times.

Reload across workers: a small state directory holds ``state.json`` (``generation``,
``source``), changed under an ``flock`` and replaced atomically (write, then rename). A reload
(``POST /v1/admin/reload`` to any worker, or SIGHUP to the parent or a worker) increments the
generation; each worker watches the file (a ``stat`` every 50 ms), reloads on a new generation
and writes an acknowledgement (its generation and model sha256) to ``acks/<pid>``. The worker
that took the HTTP reload loads first (a refused artifact is a 409 and nothing is published),
then answers only once every worker has acknowledged, so after a 200 every worker serves the
new model. During the reload, requests are served by the old or the new model, never failed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from recforge.artifact import MODEL

log = logging.getLogger(__name__)

STATE, LOCK, ACKS = "state.json", "state.lock", "acks"
POLL_S = 0.05
ACK_TIMEOUT_S = 300.0  # a worker loads the artifact itself; a large one takes minutes


class Cluster:
    """One process's view of the shared reload state (workers and the parent)."""

    def __init__(self, directory: str | os.PathLike, workers: int) -> None:
        self.directory, self.workers = Path(directory), workers
        self.generation = -1  # what this worker serves
        self._lock = threading.Lock()  # one reload at a time in this worker

    @classmethod
    def create(cls, source: str, workers: int) -> Cluster:
        cluster = cls(tempfile.mkdtemp(prefix="recforge-serve-"), workers)
        (cluster.directory / ACKS).mkdir()
        cluster._write({"generation": 0, "source": source})
        return cluster

    def state(self) -> dict[str, Any]:
        return json.loads((self.directory / STATE).read_text())

    def publish(self, source: str) -> int:
        """A new generation serving ``source``; returns its number."""
        with open(self.directory / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # read-increment-write by one process at a time
            generation = self.state()["generation"] + 1
            self._write({"generation": generation, "source": source})
        return generation

    def _write(self, state: dict[str, Any]) -> None:
        tmp = self.directory / f".{STATE}.{os.getpid()}"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.directory / STATE)  # readers see the old file or the new, whole

    # --- in a worker ---

    def start(self, holder: Any) -> None:
        """Serve ``holder`` (loaded from :meth:`state`'s source) and follow the reloads."""
        self.generation = self.state()["generation"]
        self._ack(holder, ok=True)
        threading.Thread(target=self._watch, args=(holder,), daemon=True).start()

    def reload(self, holder: Any, source: str | None) -> Any:
        """Load here first (raises: nothing published), publish, wait for every worker."""
        with self._lock:
            model = holder.reload(source)
            self.generation = self.publish(holder.source)
            self._ack(holder, ok=True)
        acks = self.wait(self.generation)
        failed = [pid for pid, ack in acks.items() if not ack["ok"]]
        if len(acks) < self.workers or failed:
            raise OSError(
                f"the new model is served by {len(acks) - len(failed)} of {self.workers} "
                f"workers (failed: {failed or 'none'}; see the server log)"
            )
        return model

    def wait(self, generation: int, timeout_s: float = ACK_TIMEOUT_S) -> dict[int, dict]:
        """The acknowledgements of ``generation`` (or a later one), once all workers gave one."""
        deadline = time.monotonic() + timeout_s
        while True:
            acks = {}
            for path in (self.directory / ACKS).iterdir():
                try:
                    ack = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue  # replaced or removed under us: read again next round
                if ack["generation"] >= generation:
                    acks[int(path.name)] = ack
            if len(acks) >= self.workers or time.monotonic() > deadline:
                return acks
            time.sleep(POLL_S / 2)

    def _ack(self, holder: Any, ok: bool) -> None:
        ack = {
            "generation": self.generation,
            "sha256": holder.current.manifest["files"][MODEL][:12],
            "ok": ok,
        }
        tmp = self.directory / ACKS / f".{os.getpid()}"
        tmp.write_text(json.dumps(ack))
        os.replace(tmp, self.directory / ACKS / str(os.getpid()))

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
            with self._lock:
                if state["generation"] <= self.generation:
                    continue  # this worker published it (or already followed)
                self.generation = state["generation"]
                try:
                    holder.reload(state["source"])
                    ok = True
                    log.info("worker %d reloaded %s", os.getpid(), state["source"])
                except Exception as exc:
                    ok = False
                    log.error(
                        "worker %d: reload refused, still serving the old model: %s",
                        os.getpid(),
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

    def on_hup(signum: int, frame: Any) -> None:
        generation = cluster.publish(cluster.state()["source"])
        log.warning("SIGHUP: reloading every worker (generation %d)", generation)

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
