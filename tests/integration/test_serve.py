"""Export and serving for real: `recforge export` of a trained tiny SASRec (parity gate), the
artifact's sha256 checks, `recforge serve` over HTTP (bad requests and the one error shape,
content types, KServe v2 through Triton's own HTTP client, the OpenAPI contract fuzzed by
schemathesis, hot reload under concurrent load), and the serving library never importing torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from serve_contract import fuzz_openapi, triton_session
from serve_fixtures import run, serving

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "sasrec" / "tiny.yaml")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny SASRecs (seeds 0 and 1, one epoch each), exported."""
    tmp = tmp_path_factory.mktemp("serve")
    out = {"tmp": tmp}
    for name, seed in (("first", "0"), ("second", "1")):
        root = tmp / f"run-{name}"
        proc = run(
            "fit",
            "--config",
            TINY,
            "--data.data_dir",
            str(tmp / "data"),
            "--trainer.default_root_dir",
            str(root),
            "--trainer.logger.init_args.save_dir",
            str(root),
            "--trainer.max_epochs",
            "1",
            "--seed_everything",
            seed,
            "--mlflow.enabled",
            "false",
            "--test_after_fit",
            "false",
            cwd=tmp,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        ckpt = root / "sasrec-tiny" / "version_0" / "checkpoints" / "last.ckpt"
        # "full": these tests request users by the raw ids they read from users.parquet.
        proc = run(
            "export",
            "--checkpoint",
            str(ckpt),
            "--out",
            str(tmp / name),
            "--user-store",
            "full",
            cwd=tmp,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = tmp / name
        out[f"{name}-ckpt"] = ckpt
    return out


def test_checkpoint_saved_before_position_origin_keeps_its_positions(
    artifacts: dict[str, Path], tmp_path: Path
) -> None:
    """SASRec's positions count from the newest item by default now; a checkpoint whose saved
    config has no ``position_origin`` was trained counting from the oldest, and loads so."""
    import shutil

    import torch

    from recforge.trainer.checkpoint import TRAINER_STATE
    from recforge.trainer.export.loading import load_checkpoint

    assert load_checkpoint(artifacts["first-ckpt"]).network.config.position_origin == "newest"
    old = tmp_path / "old.ckpt"
    shutil.copytree(artifacts["first-ckpt"], old)
    state = torch.load(old / TRAINER_STATE, map_location="cpu", weights_only=False)
    del state["hyper_parameters"]["model"]["position_origin"]
    torch.save(state, old / TRAINER_STATE)
    assert load_checkpoint(old).network.config.position_origin == "oldest"


def test_export_writes_a_verified_artifact_and_passes_parity(artifacts: dict[str, Path]) -> None:
    import onnxruntime as ort

    art = artifacts["first"]
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["kind"] == "sasrec" and manifest["opset"] >= 17
    assert set(manifest["files"]) == {
        "model.onnx",
        "item_embeddings.npy",
        "items.parquet",
        "users.parquet",
        "MODEL_CARD.md",
    }
    assert manifest["parity"]["max_abs_diff"] <= 1e-4
    assert {(c["batch"], c["length"]) for c in manifest["parity"]["cases"]} >= {(1, 1), (64, 20)}
    assert all(c["same_top10"] for c in manifest["parity"]["cases"])
    assert (
        manifest["dataset"]["fingerprint"]
        == json.loads((artifacts["tmp"] / "data" / "manifest.json").read_text())["fingerprint"]
    )
    # Dynamic batch and length: a shape the exporter never saw.
    session = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.zeros((5, 13), dtype=np.int64)
    ids[:, :4] = [[1, 2, 3, 4]] * 5
    out = session.run(["user_vector"], {"item_ids": ids})[0]
    assert out.shape == (5, manifest["dim"]) and np.isfinite(out).all()
    assert np.allclose(out, out[0], atol=1e-6), (
        "identical histories give identical vectors, padding ignored"
    )


def test_parity_gate_fails_loudly(artifacts: dict[str, Path]) -> None:
    tmp = artifacts["tmp"]
    ckpt = json.loads((artifacts["first"] / "manifest.json").read_text())["checkpoint"]
    proc = run(
        "export",
        "--checkpoint",
        ckpt,
        "--out",
        str(tmp / "strict"),
        "--tolerance",
        "1e-12",
        cwd=tmp,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "parity failed" in last and "max |diff|" in last, last
    assert not (tmp / "strict").exists() and not list(tmp.glob(".strict.partial-*")), (
        "nothing half-written"
    )


def test_tampered_or_incomplete_artifact_is_refused(
    artifacts: dict[str, Path], tmp_path: Path
) -> None:
    from recforge.serve.artifact import ArtifactError
    from recforge.serve.recommender import Recommender

    bad = tmp_path / "tampered"
    shutil.copytree(artifacts["first"], bad)
    data = bytearray((bad / "item_embeddings.npy").read_bytes())
    data[-1] ^= 0xFF
    (bad / "item_embeddings.npy").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"item_embeddings\.npy: sha256 .* does not match"):
        Recommender.load(bad)
    proc = run("serve", str(bad), "--port", "1", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "does not match the manifest" in proc.stderr

    missing = tmp_path / "incomplete"
    shutil.copytree(artifacts["first"], missing)
    (missing / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"model\.onnx is missing"):
        Recommender.load(missing)


def test_library_recommends_by_user_and_history(artifacts: dict[str, Path]) -> None:
    from recforge.serve.artifact import ArtifactError  # noqa: F401  (import check only)
    from recforge.serve.recommender import Recommender, RequestError

    rec = Recommender.load(artifacts["first"])
    user = max(rec.histories, key=lambda u: len(rec.histories[u]))
    assert len(rec.histories[user]) > rec.max_len, "a history longer than the encoder reads"
    seen = {rec.item_ids[i - 1] for i in rec.histories[user]}
    result = rec.recommend(user_id=user, k=10)
    assert len(result.items) == 10 and not result.fallback
    assert not seen & set(result.items), (
        "exclude_seen removes all the user's items, not only the last L"
    )
    assert not seen & set(rec.recommend(user_id=user, k=rec.num_items - len(seen)).items)
    assert result.scores == sorted(result.scores, reverse=True)
    unfiltered = rec.recommend(user_id=user, k=10, exclude_seen=False, exclude=[result.items[0]])
    assert result.items[0] not in unfiltered.items
    mixed = rec.recommend(history=[rec.item_ids[0], "no-such-item"], k=3)
    assert mixed.unknown_history_items == ["no-such-item"] and not mixed.fallback
    cold = rec.recommend(history=["no-such-item"], k=3)
    assert cold.fallback and len(cold.items) == 3
    with pytest.raises(RequestError, match="unknown"):
        rec.recommend(user_id="nobody", k=3)
    with pytest.raises(RequestError, match="reads no user features"):
        rec.recommend(history=[rec.item_ids[0]], user_features={"country": "DE"})
    # Batch form equals single requests.
    batch = rec.recommend_batch([{"user_id": user, "k": 5}, {"history": [rec.item_ids[1]], "k": 5}])
    assert batch[0].items == rec.recommend(user_id=user, k=5).items
    # HNSW on this small catalogue agrees with the exact search on the top items.
    ann = Recommender.load(artifacts["first"], index="hnsw")
    assert ann.recommend(user_id=user, k=10).items[:5] == result.items[:5]


def test_serving_does_not_import_torch(artifacts: dict[str, Path]) -> None:
    code = (
        "import sys; from serve.http import create_app; app = create_app(sys.argv[1]); "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(artifacts["first"])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def server(artifacts: dict[str, Path]):
    with serving(artifacts["first"], artifacts["tmp"]) as (url, proc):
        yield {"url": url, "proc": proc}


def test_http_routes(server: dict, artifacts: dict[str, Path]) -> None:
    url = server["url"]
    manifest = requests.get(url + "/v1/model", timeout=10).json()
    assert (
        manifest["files"] == json.loads((artifacts["first"] / "manifest.json").read_text())["files"]
    )
    from recforge.serve.recommender import Recommender

    rec = Recommender.load(artifacts["first"])
    user = next(iter(rec.histories))
    body = requests.post(url + "/v1/recommend", json={"user_id": user, "k": 5}, timeout=10).json()
    assert [x["item_id"] for x in body["items"]] == rec.recommend(user_id=user, k=5).items
    batch = requests.post(
        url + "/v1/recommend:batch",
        json={
            "requests": [{"user_id": user, "k": 2}, {"history": [rec.item_ids[0], "zzz"], "k": 3}]
        },
        timeout=10,
    ).json()["results"]
    assert len(batch[0]["items"]) == 2 and batch[1]["unknown_history_items"] == ["zzz"]
    assert requests.get(url + "/openapi.json", timeout=10).json()["paths"]["/v1/recommend"]
    # KServe v2 on the raw model.
    meta = requests.get(url + "/v2/models/recforge", timeout=10).json()
    assert meta["inputs"][0]["name"] == "item_ids" and meta["inputs"][0]["datatype"] == "INT64"
    infer = requests.post(
        url + "/v2/models/recforge/infer",
        json={
            "inputs": [
                {
                    "name": "item_ids",
                    "shape": [2, 3],
                    "datatype": "INT64",
                    "data": [1, 2, 0, 3, 0, 0],
                }
            ]
        },
        timeout=10,
    ).json()
    out = infer["outputs"][0]
    expected = rec.encode_histories(np.array([[1, 2, 0], [3, 0, 0]], dtype=np.int64))
    assert out["shape"] == [2, manifest["dim"]]
    assert np.allclose(np.array(out["data"]).reshape(2, -1), expected, atol=1e-5)
    assert requests.get(url + "/v2/health/ready", timeout=10).json()["ready"] is True
    assert requests.get(url + "/v2/health/live", timeout=10).json()["live"] is True


def _error(response: requests.Response, status: int, code: str, field: str | None = None) -> str:
    """The one error shape: ``{"error": message, "code": kind, "field": path or null}``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "code", "field"} and body["error"], body
    assert body["code"] == code and body["field"] == field, body
    return body["error"]


@pytest.mark.parametrize(
    "body,status,code,field",
    [
        ({"user_id": "nobody", "k": 5}, 404, "unknown_user", "user_id"),
        ({"history": [1], "k": 0}, 422, "invalid_request", "k"),
        ({"history": [1], "k": 10**9}, 422, "invalid_request", "k"),
        ({"history": [1], "k": "ten"}, 422, "invalid_request", "k"),
        ({"history": [1], "k": 2.5}, 422, "invalid_request", "k"),
        ({"history": [{"id": 1}], "k": 3}, 422, "invalid_request", "history.0"),
        ({"history": "1,2,3"}, 422, "invalid_request", "history"),
        ({"k": 3}, 422, "invalid_request", None),
        ({"history": [1], "colour": "red"}, 422, "invalid_request", "colour"),
        ([1, 2, 3], 422, "invalid_request", None),
    ],
)
def test_bad_requests_get_4xx_with_a_message(
    server: dict, body: object, status: int, code: str, field: str | None
) -> None:
    response = requests.post(server["url"] + "/v1/recommend", json=body, timeout=10)
    _error(response, status, code, field)


def test_json_with_any_json_content_type_and_415_otherwise(server: dict) -> None:
    """Triton's client and ``curl -d`` send JSON without a JSON content type; both are read."""
    url, body = server["url"] + "/v1/recommend", json.dumps({"history": [1, 2], "k": 2})
    for content_type in (
        None,
        "application/json",
        "application/json; charset=utf-8",
        "application/vnd.api+json",
        "application/x-www-form-urlencoded",  # curl -d without -H
    ):
        headers = {"content-type": content_type} if content_type else {}
        response = requests.post(url, data=body.encode(), headers=headers, timeout=10)
        assert response.status_code == 200 and len(response.json()["items"]) == 2, response.text
    for content_type in ("text/xml", "multipart/form-data; boundary=x", "application/octet-stream"):
        response = requests.post(url, data=body, headers={"content-type": content_type}, timeout=10)
        message = _error(response, 415, "unsupported_media_type")
        assert "application/json" in message and "curl -d" in message
    # 5.0 is JSON Schema's integer 5, as JSON has one number type.
    response = requests.post(url, json={"history": [1.0], "k": 2.0}, timeout=10)
    assert response.status_code == 200 and len(response.json()["items"]) == 2
    # Unknown routes and methods answer in the same shape.
    _error(requests.get(server["url"] + "/v3/nothing", timeout=10), 404, "not_found")
    _error(requests.put(url, json={}, timeout=10), 405, "method_not_allowed")


def test_triton_http_client_json_and_binary(server: dict, artifacts: dict[str, Path]) -> None:
    from recforge.serve.recommender import Recommender

    triton_session(server["url"], Recommender.load(artifacts["first"]))


def test_openapi_contract_holds_under_fuzzing(server: dict) -> None:
    """schemathesis, 30 valid and 30 invalid requests per operation, fixed seed."""
    sent = fuzz_openapi(server["url"])
    assert sent["POST /v1/recommend [positive]"] >= 20 and len(sent) >= 16
    spec = requests.get(server["url"] + "/openapi.json", timeout=10).json()
    request = spec["components"]["schemas"]["RecommendRequest"]
    assert request["properties"]["k"]["maximum"] == min(1000, spec_items(server))
    assert request["properties"]["user_features"]["anyOf"][0]["maxProperties"] == 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith("4"):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, method)


def spec_items(server: dict) -> int:
    return requests.get(server["url"] + "/healthz", timeout=10).json()["items"]


def test_malformed_oversized_and_bad_v2_requests(server: dict) -> None:
    url = server["url"]
    response = requests.post(
        url + "/v1/recommend",
        data=b"{not json",
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert "not valid JSON" in _error(response, 400, "malformed_body")
    huge = {"history": list(range(300_000))}
    _error(requests.post(url + "/v1/recommend", json=huge, timeout=30), 413, "body_too_large")
    # Chunked bodies (no Content-Length) are capped too, and small ones still reach the route.
    chunks = lambda body: (body[i : i + 4096] for i in range(0, len(body), 4096))  # noqa: E731
    assert (
        requests.post(
            url + "/v1/recommend",
            data=chunks(json.dumps(huge).encode()),
            headers={"content-type": "application/json"},
            timeout=30,
        ).status_code
        == 413
    )
    small = requests.post(
        url + "/v1/recommend",
        data=chunks(json.dumps({"history": [1, 2], "k": 2}).encode()),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert small.status_code == 200 and len(small.json()["items"]) == 2, small.text
    bad = {
        "inputs": [{"name": "item_ids", "shape": [1, 2], "datatype": "INT64", "data": [1, 10**9]}]
    }
    response = requests.post(url + "/v2/models/recforge/infer", json=bad, timeout=10)
    assert "must lie in" in _error(response, 422, "invalid_request")
    response = requests.post(url + "/v2/models/other/infer", json=bad, timeout=10)
    _error(response, 404, "unknown_model")
    response = requests.post(url + "/v2/models/recforge/versions/7/infer", json=bad, timeout=10)
    _error(response, 404, "unknown_model")
    # Binary framing that does not add up is a 400; so is a header longer than the body.
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "item_ids",
                    "shape": [1, 2],
                    "datatype": "INT64",
                    "parameters": {"binary_data_size": 16},
                }
            ]
        }
    ).encode()
    for extra, length in ((b"\0" * 8, len(header)), (b"\0" * 24, len(header)), (b"", 10**6)):
        response = requests.post(
            url + "/v2/models/recforge/infer",
            data=header + extra,
            headers={"Inference-Header-Content-Length": str(length)},
            timeout=10,
        )
        _error(response, 400, "malformed_body")
    ok = requests.post(
        url + "/v2/models/recforge/infer",
        data=header + np.array([1, 2], dtype="<i8").tobytes(),
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "content-type": "application/octet-stream",
        },
        timeout=10,
    )
    assert ok.status_code == 200 and ok.headers["content-type"] == "application/json", ok.text


def test_reload_under_load_drops_no_request(server: dict, artifacts: dict[str, Path]) -> None:
    url = server["url"]
    before = requests.get(url + "/healthz", timeout=10).json()["model"]["sha256"]
    errors: list[str] = []
    done = threading.Event()
    counts = [0]

    def client() -> None:
        session = requests.Session()
        while not done.is_set():
            try:
                r = session.post(
                    url + "/v1/recommend", json={"history": [1, 2, 3], "k": 10}, timeout=30
                )
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                counts[0] += 1
            except requests.RequestException as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    shas = []
    for source in ("second", "first", "second"):
        time.sleep(0.5)
        r = requests.post(
            url + "/v1/admin/reload", json={"source": str(artifacts[source])}, timeout=60
        )
        assert r.status_code == 200, r.text
        shas.append(r.json()["model"]["sha256"])
    refused = requests.post(
        url + "/v1/admin/reload", json={"source": str(artifacts["tmp"] / "nope")}, timeout=60
    )
    time.sleep(0.5)
    done.set()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    assert counts[0] > 20
    assert shas[0] != before and shas[1] == before
    assert "still serving the old model" in _error(refused, 409, "reload_refused", "source")
    assert requests.get(url + "/healthz", timeout=10).json()["model"]["sha256"] == shas[2]


def test_triton_repository_matches_the_onnx_graph(artifacts: dict[str, Path]) -> None:
    import hashlib
    import re

    import onnx

    tmp = artifacts["tmp"]
    ckpt = json.loads((artifacts["first"] / "manifest.json").read_text())["checkpoint"]
    proc = run(
        "export",
        "--checkpoint",
        ckpt,
        "--out",
        str(tmp / "for-triton"),
        "--triton",
        str(tmp / "triton"),
        "--triton-name",
        "sasrec",
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    model_dir = tmp / "triton" / "sasrec"
    config = (model_dir / "config.pbtxt").read_text()
    onnx_path = model_dir / "1" / "model.onnx"
    graph = onnx.load(str(onnx_path)).graph
    assert re.search(r'backend: "onnxruntime"', config) and 'name: "sasrec"' in config
    assert [i.name for i in graph.input] == re.findall(r'input \[\s*\{\s*name: "(\w+)"', config)
    assert [o.name for o in graph.output] == re.findall(r'output \[\s*\{\s*name: "(\w+)"', config)
    dim = json.loads((tmp / "for-triton" / "manifest.json").read_text())["dim"]
    assert f"dims: [ -1, {dim} ]" in config and "TYPE_INT64" in config and "TYPE_FP32" in config
    sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert (
        sha == json.loads((tmp / "for-triton" / "manifest.json").read_text())["files"]["model.onnx"]
    )
