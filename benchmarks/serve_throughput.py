"""Serving throughput against the model's own (run by `benchmarks/serve_latency.py`): requests/s
through `Recommender.recommend_batch` at batch 64, a lone request in process, then `recforge
serve` over loopback with 1, 20 and 100 closed-loop clients, dynamic batching on and off
(`--max-batch-size 64` / `1`), 1 and 2 workers. The load generator (aiohttp, one event loop) runs
in this process on the same cores as the server; its CPU share is this process's CPU time over
the cell's wall time x cores. Servers run with `--max-concurrency 256`, so the 100-client cells
measure throughput rather than the overload answer (503).

The last row of each table is the ceiling of the HTTP stack itself on these cores: the same
uvicorn (httptools parser, one worker) serving a pure ASGI app that reads the body and answers a
constant 10-item response, loaded by the same generator at 20 clients. No server built on this
stack can beat it, so it says how much of a gap to the model's rate is our request path."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLIENTS = (1, 20, 100)
CONFIGS = (("on", 1), ("off", 1), ("on", 2), ("off", 2))


def model_throughput(path: Path, bodies: list[dict], seconds: float = 3.0) -> tuple[float, float]:
    """(requests/s through recommend_batch at batch 64, lone request p50 ms), in process."""
    from recforge.serve.recommender import Recommender

    rec = Recommender.load(path)
    batch = bodies[:64]
    rec.recommend_batch(batch)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        rec.recommend_batch(batch)
        done += len(batch)
    rate = done / (time.perf_counter() - start)
    lone = []
    for body in bodies[:200]:
        t = time.perf_counter()
        rec.recommend(**body)
        lone.append(time.perf_counter() - t)
    return rate, float(np.median(lone) * 1000)


async def _load(url: str, payloads: list[bytes], clients: int, seconds: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    until = time.monotonic() + seconds

    async def client(session, n: int) -> None:
        i = n
        while time.monotonic() < until:
            start = time.perf_counter()
            try:
                async with session.post(
                    url + "/v1/recommend",
                    data=payloads[i % len(payloads)],
                    headers={"content-type": "application/json"},
                ) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status = type(exc).__name__
            if status == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1
            i += clients

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        cpu, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client(session, n) for n in range(clients)))
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
    a = np.array(latencies or [float("nan")]) * 1000
    return {
        "rps": len(latencies) / wall,
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
        "errors": sum(errors.values()),
        "loadgen_cpu": cpu / (wall * (os.cpu_count() or 1)),
    }


CEILING_APP = """
import sys, uvicorn
BODY = b'{"items":[' + b','.join(b'{"item_id":%d,"score":0.5}' % i for i in range(10)) + b']}'
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": BODY})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def ceiling_cell(bodies: list[dict], seconds: float, clients: int = 20) -> dict:
    """The load generator against a constant-answer ASGI app on the same uvicorn stack."""
    from recforge.serve.local import free_port, wait_healthy

    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", CEILING_APP, str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url + "/healthz", timeout_s=60, proc=server)
        payloads = [json.dumps(b).encode() for b in bodies]
        asyncio.run(_load(url, payloads, 4, 1.0))
        return asyncio.run(_load(url, payloads, clients, seconds))
    finally:
        server.terminate()
        server.wait(timeout=30)


def http_cells(path: Path, bodies: list[dict], seconds: float) -> list[tuple]:
    from recforge.serve.local import free_port, wait_healthy

    payloads = [json.dumps(b).encode() for b in bodies]
    rows = []
    for batching, workers in CONFIGS:
        port = free_port()
        server = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("recforge")),
                "serve",
                str(path),
                "--port",
                str(port),
                "--workers",
                str(workers),
                "--max-batch-size",
                "64" if batching == "on" else "1",
                "--max-concurrency",
                "256",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url + "/healthz", timeout_s=120, proc=server)
            time.sleep(2.0 * workers)  # every worker loaded, not just the first to answer
            asyncio.run(_load(url, payloads, 4, 1.0))  # warm-up
            for clients in CLIENTS:
                cell = asyncio.run(_load(url, payloads, clients, seconds))
                rows.append((batching, workers, clients, cell))
        finally:
            server.terminate()
            server.wait(timeout=30)
    return rows


def report(name: str, path: Path, bodies: list[dict], seconds: float) -> None:
    rate, lone_ms = model_throughput(path, bodies)
    print(
        f"\n{name}: model throughput recommend_batch(64) {rate:.0f} requests/s; lone request "
        f"in process p50 {lone_ms:.2f} ms; {os.cpu_count()} cores shared with the load generator"
    )
    print(
        f"{'batching':>8} {'workers':>7} {'clients':>7} | {'requests/s':>10} {'% of model':>10} | "
        f"{'p50 ms':>7} {'p99 ms':>7} | {'errors':>6} | {'loadgen CPU':>11}"
    )
    for batching, workers, clients, c in http_cells(path, bodies, seconds):
        print(
            f"{batching:>8} {workers:>7} {clients:>7} | {c['rps']:10.0f} "
            f"{100 * c['rps'] / rate:9.0f}% | {c['p50']:7.2f} {c['p99']:7.2f} | "
            f"{c['errors']:6d} | {100 * c['loadgen_cpu']:10.0f}%"
        )
    c = ceiling_cell(bodies, seconds)
    print(
        f"{'ceiling':>8} {'-':>7} {20:>7} | {c['rps']:10.0f} "
        f"{100 * c['rps'] / rate:9.0f}% | {c['p50']:7.2f} {c['p99']:7.2f} | "
        f"{c['errors']:6d} | {100 * c['loadgen_cpu']:10.0f}%"
    )
