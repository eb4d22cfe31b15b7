"""A bounded soak of `recforge serve`, and latency under 20, 100 and 400 concurrent clients with
and without `--max-concurrency`.

    python benchmarks/serve_soak.py [--duration 600] [--clients 20] [--reload-interval 30]
                                    [--sweep 20,100,400] [--sweep-seconds 30] [--limit 64]

The artifact is the SASRec of `benchmarks/serve_latency.py` (the shape of
`configs/sasrec/ml1m_fast.yaml`: D=64, 2 layers, L=200, 3,416 items, random weights), built the same
way. Requests are `POST /v1/recommend` with a 50-item history and k=10, sent over loopback by
asyncio clients (aiohttp, one process), each sending its next request when the last answers.

- **Soak**: one server (default `--max-concurrency`), ``--clients`` clients for ``--duration``
  seconds, a hot reload (`POST /v1/admin/reload`) every ``--reload-interval`` seconds. Reports
  requests/s, p50/p99, errors (anything but 200, or no answer), reloads, and the server's RSS
  after warm-up, at the end and at its peak; then its `/metrics` counters.
- **Sweep**: for each client count in ``--sweep``, ``--sweep-seconds`` each, a server with no limit
  (`--max-concurrency 0`) and one with ``--limit``: requests/s answered 200, p50/p99 of those,
  503s (the client then waits the `Retry-After` seconds, as a polite client does) and their p50,
  other errors.

Client and server share the machine's cores: on a small machine the figures measure both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from serve_latency import NUM_ITEMS, build_artifact, models  # noqa: E402

RECFORGE = str(Path(sys.executable).with_name("recforge"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """``recforge serve ARTIFACT --max-concurrency LIMIT`` on a free loopback port."""

    def __init__(self, artifact: Path, limit: int) -> None:
        from recforge.serve.local import free_port, wait_healthy

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [RECFORGE, "serve", str(artifact), "--port", str(self.port)]
            + ["--max-concurrency", str(limit)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_healthy(self.url + "/healthz", timeout_s=120, proc=self.proc)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Load:
    """Closed-loop clients: each sends its next request when the last one answers."""

    def __init__(self, url: str, bodies: list[bytes]) -> None:
        self.url, self.bodies = url, bodies
        self.ok: list[float] = []
        self.rejected: list[float] = []
        self.errors: dict[str, int] = {}

    async def client(self, session, n: int, clients: int, until: float) -> None:
        import aiohttp

        i = n
        headers = {"content-type": "application/json"}
        while time.monotonic() < until:
            body = self.bodies[i % len(self.bodies)]
            i += clients
            start = time.perf_counter()
            try:
                async with session.post(
                    self.url + "/v1/recommend", data=body, headers=headers
                ) as response:
                    await response.read()
                    status, retry = response.status, response.headers.get("retry-after")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status, retry = type(exc).__name__, None
            elapsed = time.perf_counter() - start
            if status == 200:
                self.ok.append(elapsed)
            elif status == 503 and retry:
                self.rejected.append(elapsed)
                await asyncio.sleep(min(float(retry), max(0.0, until - time.monotonic())))
            else:
                self.errors[str(status)] = self.errors.get(str(status), 0) + 1

    async def run(self, clients: int, seconds: float, every: float = 0.0, on_tick=None) -> float:
        """``clients`` clients for ``seconds``; ``on_tick()`` (async) every ``every`` seconds.
        Returns the wall time."""
        import aiohttp

        until = time.monotonic() + seconds
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            start = time.monotonic()
            tasks = [
                asyncio.create_task(self.client(session, n, clients, until)) for n in range(clients)
            ]
            if on_tick is not None and every > 0:
                while time.monotonic() + every < until:
                    await asyncio.sleep(every)
                    await on_tick(session)
            await asyncio.gather(*tasks)
            return time.monotonic() - start


def ms(samples: list[float], q: float) -> float:
    return float(np.percentile(np.array(samples) * 1000, q)) if samples else float("nan")


def soak(artifact: Path, bodies: list[bytes], args: argparse.Namespace) -> None:
    import requests

    server = Server(artifact, args.limit)
    pid = server.proc.pid
    warm = Load(server.url, bodies)
    asyncio.run(warm.run(args.clients, 3.0))  # warm-up, not counted
    rss_start = rss_mb(pid)
    load = Load(server.url, bodies)
    reloads: list[int] = []
    peak = [rss_start]
    trace: list[float] = []  # RSS right after each reload: a leak grows it reload after reload

    async def reload(session) -> None:
        peak[0] = max(peak[0], rss_mb(pid))
        async with session.post(server.url + "/v1/admin/reload", json={}) as response:
            reloads.append(response.status)
        trace.append(rss_mb(pid))
        peak[0] = max(peak[0], trace[-1])

    wall = asyncio.run(load.run(args.clients, args.duration, args.reload_interval, reload))
    rss_end = rss_mb(pid)
    time.sleep(1.0)
    rss_idle = rss_mb(pid)
    text = requests.get(server.url + "/metrics", timeout=10).text
    server.close()
    counters = [
        line
        for line in text.splitlines()
        if line.startswith(
            (
                "recforge_http_requests_total",
                "recforge_http_errors_total",
                "recforge_model_reloads_total",
                "recforge_http_rejected_overload_total",
                "recforge_fallbacks_total",
            )
        )
    ]
    total = len(load.ok) + len(load.rejected) + sum(load.errors.values())
    print(
        f"\nsoak: {args.clients} clients, {wall:.0f} s, history 50, k=10, "
        f"--max-concurrency {args.limit}, reload every {args.reload_interval:g} s"
    )
    print(
        f"requests: {total}  requests/s: {total / wall:.0f}  p50: {ms(load.ok, 50):.1f} ms  "
        f"p99: {ms(load.ok, 99):.1f} ms  errors: {sum(load.errors.values())} {load.errors or ''}"
        f"  503s: {len(load.rejected)}"
    )
    print(
        f"reloads: {len(reloads)} (statuses {sorted(set(reloads))})  RSS MB: after warm-up "
        f"{rss_start:.0f}, end {rss_end:.0f} (idle 1 s later {rss_idle:.0f}), "
        f"peak seen {max(peak[0], rss_end):.0f}"
    )
    if trace:
        half = trace[len(trace) // 2 :]
        print(
            "RSS MB after each reload: " + " ".join(f"{v:.0f}" for v in trace) + f"\n"
            f"  second half of the soak: {min(half):.0f}..{max(half):.0f} MB, "
            f"{(half[-1] - half[0]) / max(1, len(half) - 1):+.2f} MB per reload"
        )
    print("/metrics:\n  " + "\n  ".join(counters))


def sweep(artifact: Path, bodies: list[bytes], args: argparse.Namespace) -> None:
    counts = [int(c) for c in args.sweep.split(",") if c]
    rows = []
    for limit in (0, args.limit):
        server = Server(artifact, limit)
        asyncio.run(Load(server.url, bodies).run(8, 2.0))  # warm-up
        for clients in counts:
            load = Load(server.url, bodies)
            wall = asyncio.run(load.run(clients, args.sweep_seconds))
            rows.append((limit, clients, wall, load))
        server.close()
    print(f"\nconcurrency sweep: {args.sweep_seconds:g} s per row, history 50, k=10")
    print(
        f"{'--max-concurrency':>17} {'clients':>7} | {'200/s':>6} {'p50 ms':>8} {'p99 ms':>8} | "
        f"{'503s':>6} {'503 p50 ms':>10} | errors"
    )
    for limit, clients, wall, load in rows:
        print(
            f"{limit or 'none':>17} {clients:>7} | {len(load.ok) / wall:6.0f} "
            f"{ms(load.ok, 50):8.1f} {ms(load.ok, 99):8.1f} | {len(load.rejected):>6} "
            f"{ms(load.rejected, 50):10.1f} | {sum(load.errors.values())} {load.errors or ''}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=600.0, help="soak seconds (0: none)")
    parser.add_argument("--clients", type=int, default=20, help="soak clients")
    parser.add_argument("--reload-interval", type=float, default=30.0, help="seconds")
    parser.add_argument("--sweep", default="20,100,400", help="client counts ('': no sweep)")
    parser.add_argument("--sweep-seconds", type=float, default=30.0)
    parser.add_argument("--limit", type=int, default=64, help="--max-concurrency when limited")
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f} (client and server)")
    rng = np.random.default_rng(1)
    bodies = [
        json.dumps({"history": rng.integers(1, NUM_ITEMS + 1, 50).tolist(), "k": 10}).encode()
        for _ in range(64)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        import torch

        torch.set_num_threads(1)
        _network, encoder = models()["SASRec"]
        artifact = Path(tmp) / "sasrec"
        build_artifact(artifact, encoder, encoder.item_vectors())
        if args.duration > 0:
            soak(artifact, bodies, args)
        if args.sweep:
            sweep(artifact, bodies, args)


if __name__ == "__main__":
    main()
