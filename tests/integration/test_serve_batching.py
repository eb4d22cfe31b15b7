"""Serving throughput features for real: dynamic batching answers exactly what unbatched serving
answers (in process through the batcher, and over HTTP under concurrency, errors included), and
`--workers 2` serves one port from two processes that a hot reload (HTTP, or SIGHUP to the
parent) reaches both of. Artifacts: random-weight SASRecs of the ml1m shape, built as
`benchmarks/serve_latency.py` builds them (no training)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from test_serve_ops import NUM_ITEMS, artifacts, serving  # noqa: F401  (the module fixture)


def mixed_requests(n: int, seed: int = 0) -> list[dict]:
    """Known users, histories of every length (empty: the fallback), k, exclusions, diversity,
    explanations (short histories: explaining costs a model run per history item)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        request: dict = {"k": int(rng.integers(1, 40))}
        if i % 7 == 0:
            request["user_id"] = 1
        else:
            request["history"] = rng.integers(1, NUM_ITEMS + 1, int(rng.integers(0, 201))).tolist()
        if i % 3 == 0:
            request["exclude"] = rng.integers(1, NUM_ITEMS + 1, 20).tolist()
        if i % 4 == 0:
            request["exclude_seen"] = False
        if i % 5 == 0:
            request["diversity"] = 0.5
        if i % 11 == 0:
            request["history"] = rng.integers(1, NUM_ITEMS + 1, 5).tolist()
            request["explain"] = True
        out.append(request)
    return out


def same(batched, alone) -> None:
    assert batched.items == alone.items
    np.testing.assert_allclose(batched.scores, alone.scores, rtol=1e-5, atol=1e-5)
    assert batched.fallback == alone.fallback
    assert batched.unknown_history_items == alone.unknown_history_items
    assert (batched.because is None) == (alone.because is None)


def test_batcher_answers_equal_each_request_alone(artifacts: dict[str, Path]) -> None:  # noqa: F811
    from recforge.serve.batcher import Batcher
    from recforge.serve.recommender import Recommender, RequestError, UnknownUserError

    model = Recommender.load(artifacts["first"])
    batcher = Batcher(max_batch_size=16, max_queue_delay_us=20_000)
    requests_ = mixed_requests(60)
    bad = [{"history": [1], "k": 0}, {"user_id": 999_999}]  # 422 and 404 amid good ones

    async def fire() -> list:
        jobs = [batcher.submit(model, [r]) for r in requests_]
        jobs += [batcher.submit(model, [r]) for r in bad]
        jobs.append(batcher.submit(model, requests_[:5]))  # a :batch body is one job
        return await asyncio.gather(*jobs, return_exceptions=True)

    try:
        answers = asyncio.run(fire())
    finally:
        batcher.close()
    assert batcher.batches > 0 and batcher.batched_requests > batcher.batches  # merged calls
    for request, answer in zip(requests_, answers):
        same(answer[0], model.recommend(**request))
    assert isinstance(answers[len(requests_)], RequestError)
    assert isinstance(answers[len(requests_) + 1], UnknownUserError)
    for request, answer in zip(requests_[:5], answers[-1]):
        same(answer, model.recommend(**request))


def test_http_batched_equals_unbatched_under_concurrency(artifacts: dict[str, Path]) -> None:  # noqa: F811
    from recforge.serve.recommender import Recommender

    model = Recommender.load(artifacts["first"])
    bodies = mixed_requests(80, seed=1) + [{"history": [1], "k": 0}, {"user_id": 424242}]
    with serving(artifacts["first"], artifacts["tmp"], "--max-queue-delay-us", "5000") as (
        url,
        _,
        _,
    ):
        with ThreadPoolExecutor(20) as pool:
            answers = list(
                pool.map(lambda b: requests.post(url + "/v1/recommend", json=b, timeout=60), bodies)
            )
    for body, answer in zip(bodies[:-2], answers):
        assert answer.status_code == 200, answer.text
        alone = model.recommend(**body)
        got = answer.json()
        assert [i["item_id"] for i in got["items"]] == alone.items
        np.testing.assert_allclose([i["score"] for i in got["items"]], alone.scores, rtol=1e-5)
        assert got["fallback"] == alone.fallback
    assert answers[-2].status_code == 422 and answers[-2].json()["field"] == "k"
    assert answers[-1].status_code == 404 and answers[-1].json()["code"] == "unknown_user"


def test_two_workers_reload_reaches_both(artifacts: dict[str, Path]) -> None:  # noqa: F811
    sha = {
        name: requests_sha(artifacts[name]) for name in ("first", "second")
    }  # manifest sha256[:12]
    with serving(artifacts["first"], artifacts["tmp"], "--workers", "2") as (url, proc, log):
        deadline = time.monotonic() + 60
        workers: set[int] = set()
        while len(workers) < 2 and time.monotonic() < deadline:  # both up (each its own load)
            health = requests.get(url + "/healthz", timeout=10).json()
            workers.add(health["worker"])
        assert len(workers) == 2, log.read_text()[-2000:]
        body = {"history": list(range(1, 150)), "k": 10}
        watching = threading.Event()
        watching.set()

        def watch() -> list[tuple[float, float, str]]:
            """(start, end, model) of /healthz after /healthz, each on a new connection (so the
            kernel spreads them over both workers)."""
            seen = []
            while watching.is_set():
                start = time.monotonic()
                health = requests.get(url + "/healthz", timeout=30).json()
                seen.append((start, time.monotonic(), health["model"]["sha256"]))
            return seen

        with ThreadPoolExecutor(8) as pool:
            watchers = [pool.submit(watch) for _ in range(3)]
            load = [
                pool.submit(
                    lambda: [
                        requests.post(url + "/v1/recommend", json=body, timeout=60).status_code
                        for _ in range(15)
                    ]
                )
                for _ in range(2)
            ]
            # Three reloads (to the second, back to the first, to the second): each a window in
            # which an unsynchronised switch would show.
            windows = []
            for target in ("second", "first", "second"):
                time.sleep(0.3)
                start = time.monotonic()
                reload = requests.post(
                    url + "/v1/admin/reload", json={"source": str(artifacts[target])}, timeout=120
                )
                windows.append((start, time.monotonic(), target, reload))
            time.sleep(0.3)
            watching.clear()
            statuses = [s for f in load for s in f.result()]
            polls = sorted(p for w in watchers for p in w.result())
        assert statuses and set(statuses) == {200}
        # Atomic across workers: within a reload, no request that started after one had been
        # answered by the new model is answered by the old one (the workers switch on one shared
        # commit); once the reload has answered, every request gets the new model.
        for i, (start, end, target, reload) in enumerate(windows):
            assert reload.status_code == 200, reload.text
            assert reload.json()["model"]["sha256"] == sha[target]
            until = windows[i + 1][0] if i + 1 < len(windows) else polls[-1][1] + 1
            during = [p for p in polls if p[0] >= start and p[1] <= until]
            new = [p for p in during if p[2] == sha[target]]
            assert new, f"reload {i}: no request saw the new model"
            first_new = min(p[1] for p in new)
            late_old = [p for p in during if p[2] != sha[target] and p[0] > first_new]
            assert not late_old, (
                f"reload {i}: {len(late_old)} of {len(during)} answered late by the old model"
            )
            assert all(p[2] == sha[target] for p in during if p[0] > end), f"reload {i}"
        seen = [requests.get(url + "/healthz", timeout=10).json() for _ in range(40)]
        assert {h["worker"] for h in seen} == workers
        assert {h["model"]["sha256"] for h in seen} == {sha["second"]}
        # SIGHUP to the parent: every worker reloads (the source is now the second artifact).
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            seen = [requests.get(url + "/healthz", timeout=10).json() for _ in range(20)]
            if {h["worker"] for h in seen} == workers and all(h["reloads"] == 4 for h in seen):
                break
            time.sleep(0.2)
        assert all(h["reloads"] == 4 for h in seen), seen
        assert {h["model"]["sha256"] for h in seen} == {sha["second"]}
    assert "Traceback" not in log.read_text()


def test_a_reload_one_worker_cannot_load_changes_no_worker(artifacts: dict[str, Path]) -> None:  # noqa: F811
    """Two workers' views of one cluster, in this process: the second cannot load the new
    artifact (it was corrupted after the first loaded it), so the reload is aborted, the first
    answers with the error, and both still serve the old model; the next reload commits."""
    from recforge.serve.holder import ModelHolder
    from recforge.serve.workers import STATE, Cluster

    new = artifacts["tmp"] / "second-copy"
    shutil.copytree(artifacts["second"], new)
    first = Cluster.create(str(artifacts["first"]), workers=2)
    try:
        a, b = Cluster(first.directory, 2, "a"), Cluster(first.directory, 2, "b")
        holders = []
        for view in (a, b):
            holders.append(ModelHolder(view.served_source(), 1, "auto", None))
            view.start(holders[-1])
        old_sha, new_sha = requests_sha(artifacts["first"]), requests_sha(new)

        def serving() -> set[str]:
            return {h.current.manifest["files"]["model.onnx"][:12] for h in holders}

        pool = ThreadPoolExecutor(1)
        with b._lock:  # b cannot stage until we let it
            reload = pool.submit(a.reload, holders[0], str(new))
            deadline = time.monotonic() + 60
            while a.state()["generation"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert a.state()["generation"] == 1, (first.directory / STATE).read_text()
            assert serving() == {old_sha}  # staged in a, not served: nothing committed
            (new / "model.onnx").write_bytes(b"not the model the manifest describes")
        try:
            reload.result(timeout=120)
            raise AssertionError("the reload was committed although a worker could not load it")
        except OSError as exc:
            pool.shutdown()
            assert "1 of 2 workers" in str(exc) and "'b'" in str(exc) and "old one" in str(exc)
        assert a.committed() == 0 and serving() == {old_sha}
        assert [h.reloads for h in holders] == [0, 0]
        a.reload(holders[0], str(artifacts["second"]))
        assert a.committed() == 2 and serving() == {new_sha}
        assert a.served_source() == str(artifacts["second"])
    finally:
        shutil.rmtree(first.directory, ignore_errors=True)


def requests_sha(directory: Path) -> str:
    import json

    from recforge.artifact import MODEL

    return json.loads((directory / "manifest.json").read_text())["files"][MODEL][:12]


def _asgi(app, path: str, chunks: list[bytes], method: str = "POST") -> tuple:
    """One request through ``app``'s whole middleware stack, in process: (status, headers,
    body), or the exception's name for what the server answers 500."""
    sent: list[dict] = []
    pending = list(chunks)

    async def receive() -> dict:
        if pending:
            body = pending.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(pending)}
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "scheme": "http",
    }
    try:
        asyncio.run(app(scope, receive, send))
    except Exception as exc:
        return ("raised", type(exc).__name__)
    return sent[0]["status"], sent[0]["headers"], b"".join(m.get("body", b"") for m in sent[1:])


def test_fast_path_answers_byte_for_byte_as_the_fastapi_routes(artifacts: dict[str, Path]) -> None:  # noqa: F811
    """serve/fastpath.py answers the recommendation routes as FastAPI's routes would (the same
    app without it): status, headers and bytes, for good bodies, every kind of bad one and JSON
    the standard library reads but orjson does not (or reads otherwise)."""
    import json

    from recforge.serve.fastpath import FastRoutes
    from recforge.serve.http import create_app

    fast = create_app(str(artifacts["first"]))
    plain = create_app(str(artifacts["first"]))
    plain.user_middleware = [m for m in plain.user_middleware if m.cls is not FastRoutes]
    assert len(plain.user_middleware) == len(fast.user_middleware) - 1
    good = mixed_requests(12, seed=2)
    bad = [
        {"user_id": 424242},
        {"history": [1], "k": 0},
        {"history": [1], "k": "ten"},
        {"history": [1], "k": 2.5},
        {"history": [{"id": 1}]},
        {"history": "1,2,3"},
        {"k": 3},
        {"history": [1], "colour": "red"},
        {"history": [1], "diversity": 2.0},
        {"history": [1], "exclude_categories": {"genre": ["a"]}},
        {"history": [1], "user_features": {"country": "DE"}},
        {"history": list(range(10_001))},
        [1, 2, 3],
    ]
    raw = [
        b"",
        b"null",
        b"{not json",
        b'"\xff"',
        b'{"history": [1, 2.0], "k": 2.0}',
        b'{"history": [NaN, 1e400, "\\ud800", 1]}',
        b'\xef\xbb\xbf{"history": [1, 2]}',
        '{"history": [1, "\u00e9"]}'.encode("utf-16"),
        b'{"history": [18446744073709551617, -9223372036854775809, 5], "k": 2}',
        b'{"user_id": 123456789012345678901234567890}',
        b'{"history": [1], "history": [2, 3], "k": 2}',
        b"[" * 990 + b"]" * 990,
    ]
    single = [json.dumps(b).encode() for b in good + bad] + raw
    batch = [
        json.dumps(b).encode()
        for b in (
            {"requests": good[:4]},
            {"requests": [good[0], {"history": [1], "k": 0}]},
            {"requests": [good[0], {"user_id": 424242}]},
            {"requests": []},
            {"requests": [good[0]] * 257},
            {},
        )
    ] + raw[:4]
    compared = set()
    for path, bodies in (("/v1/recommend", single), ("/v1/recommend:batch", batch)):
        for body in bodies:
            for chunks in ([body], [body[:3], body[3:]]):
                got = _asgi(fast, path, chunks)
                assert got == _asgi(plain, path, chunks), (path, body[:200], got)
                compared.add(got[0])
    assert compared == {200, 400, 404, 422}
    for method, path in (("GET", "/v1/recommend"), ("PUT", "/v1/recommend"), ("POST", "/v1/x")):
        got = _asgi(fast, path, [b"{}"], method)
        assert got == _asgi(plain, path, [b"{}"], method) and got[0] in (404, 405)
