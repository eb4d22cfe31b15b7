"""Two-tower export and serving for real: `recforge export` of a trained tiny two-tower model
(user id + user features), the served user vectors equal the training network's on real test
batches, and `recforge serve` answers by user and by history, and on KServe v2 with every input
(Triton's own HTTP client too); its OpenAPI document names the model's user features and holds
under schema-driven fuzzing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
from serve_contract import fuzz_openapi, triton_session
from serve_fixtures import run, serving

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "two_tower" / "tiny.yaml")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("serve-two-tower")
    root = tmp / "run"
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
        "--mlflow.enabled",
        "false",
        "--test_after_fit",
        "false",
        # Fixed (not learned) pooling weights live in a buffer the checkpoint does not hold:
        # the export must rebuild them, not leave them uninitialised.
        "--model.init_args.model.pooling",
        "exp_decay",
        "--model.init_args.model.pooling_heads",
        "1",
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = root / "two-tower-tiny" / "version_0" / "checkpoints" / "last.ckpt"
    proc = run(
        "export",
        "--checkpoint",
        str(ckpt),
        "--out",
        str(tmp / "export"),
        "--triton",
        str(tmp / "triton"),
        "--user-store",
        "full",  # the tests request users by the raw ids they read from users.parquet
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "ckpt": ckpt, "export": tmp / "export", "triton": tmp / "triton"}


def _padded(values: np.ndarray, lengths: np.ndarray, pad: int) -> np.ndarray:
    out = np.full((len(lengths), max(1, int(lengths.max()))), pad, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    for r, (s, n) in enumerate(zip(starts, lengths)):
        out[r, :n] = values[s : s + n]
    return out


def test_served_vectors_equal_the_training_network(artifact: dict[str, Path]) -> None:
    import torch

    from recforge.models.towers import HistoryPooling
    from recforge.serve.recommender import Recommender
    from recforge.trainer.export.loading import load_checkpoint

    manifest = json.loads((artifact["export"] / "manifest.json").read_text())
    assert manifest["kind"] == "two_tower" and manifest["parity"]["max_abs_diff"] <= 1e-4
    names = [spec["name"] for spec in manifest["inputs"]]
    assert names == ["item_ids", "user_idx", "user_age_bucket", "user_country"]
    rec = Recommender.load(artifact["export"])
    loaded = load_checkpoint(artifact["ckpt"])
    network = loaded.network
    c = network.config
    assert c.pooling == "exp_decay"
    fresh = HistoryPooling(c.pooling, c.history_len, c.decay, c.pooling_heads)
    assert torch.equal(network.user_tower.pooling.position_logits, fresh.position_logits)
    assert [spec.get("feature_kind") for spec in manifest["inputs"][2:]] == [
        "categorical",
        "categorical",
    ]
    with torch.no_grad():
        catalogue = network.item_vectors(torch.arange(1, network.config.num_items + 1)).numpy()
    assert np.allclose(rec.item_embeddings, catalogue, atol=1e-6)

    dm = loaded.datamodule
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    kjt = batch["features"].to_dict()
    with torch.no_grad():
        expected = network.user_vectors(
            batch["features"]
        ).numpy()  # (B, out_dim), the evaluation path
    feeds = {
        "item_ids": _padded(kjt["history"].values().numpy(), kjt["history"].lengths().numpy(), 0),
        "user_idx": batch["user_idx"].numpy().astype(np.int64),
    }
    for name in names[2:]:
        feeds[name] = _padded(kjt[name].values().numpy(), kjt[name].lengths().numpy(), -1)
    assert np.allclose(rec.run_model(feeds), expected, atol=1e-5)
    # A known user served by id uses its stored index and features.
    user = next(iter(rec.histories))
    by_id = rec.recommend(user_id=user, k=10, exclude_seen=False)
    history_only = rec.recommend(
        history=[rec.item_ids[i - 1] for i in rec.histories[user]], k=10, exclude_seen=False
    )
    assert (
        not by_id.fallback
        and len(by_id.items) == 10
        and by_id.scores == sorted(by_id.scores, reverse=True)
    )
    assert by_id.scores != history_only.scores, "user id and features change the user vector"
    # Without a known user: user_idx 0 and the "missing" code 0 of each categorical feature, as
    # training saw for users without that feature.
    recent = np.array([rec.histories[user][-rec.max_len :]], dtype=np.int64)
    cold = rec.run_model(
        {
            "item_ids": recent,
            "user_idx": np.zeros(1, np.int64),
            "user_age_bucket": np.zeros((1, 1), np.int64),
            "user_country": np.zeros((1, 1), np.int64),
        }
    )
    _assert_ranks_like(rec, history_only, cold)
    assert all(-1.0 - 1e-5 <= s <= 1.0 + 1e-5 for s in by_id.scores), "cosine scores"


def _assert_ranks_like(rec, result, vector: np.ndarray) -> None:
    """``result`` (exclude_seen off) is the top of ``vector`` against the catalogue."""
    scores = (vector @ rec.item_embeddings.T)[0]
    top = np.lexsort((np.arange(len(scores)), -scores))[: len(result.items)]
    assert result.items == [rec.item_ids[p] for p in top]
    assert np.allclose(result.scores, scores[top], atol=1e-5)


def test_new_user_served_from_raw_features(artifact: dict[str, Path]) -> None:
    from recforge.serve.recommender import Recommender, RequestError

    manifest = json.loads((artifact["export"] / "manifest.json").read_text())
    assert "user_features.json" in manifest["files"]
    vocab = json.loads((artifact["export"] / "user_features.json").read_text())
    assert set(vocab["categorical"]) == {"age_bucket", "country"} and vocab["numeric"] == []
    rec = Recommender.load(artifact["export"])
    age, country = (
        vocab["categorical"]["age_bucket"][2],
        vocab["categorical"]["country"][4],
    )  # codes 3 and 5
    result = rec.recommend(user_features={"age_bucket": age, "country": country}, k=10)
    assert not result.fallback and result.unknown_user_features == []
    vector = rec.run_model(
        {
            "item_ids": np.zeros((1, 1), np.int64),
            "user_idx": np.zeros(1, np.int64),
            "user_age_bucket": np.array([[3]]),
            "user_country": np.array([[5]]),
        }
    )
    _assert_ranks_like(rec, result, vector)
    # With a history too; an unknown value counts as missing (code 0) and is reported.
    mixed = rec.recommend(
        history=[rec.item_ids[0], rec.item_ids[7]],
        user_features={"country": "Atlantis"},
        k=5,
        exclude_seen=False,
    )
    assert mixed.unknown_user_features == ["country='Atlantis'"]
    vector = rec.run_model(
        {
            "item_ids": np.array([[1, 8]]),
            "user_idx": np.zeros(1, np.int64),
            "user_age_bucket": np.zeros((1, 1), np.int64),
            "user_country": np.zeros((1, 1), np.int64),
        }
    )
    _assert_ranks_like(rec, mixed, vector)
    for bad, message in (
        ({"height": 180}, "unknown feature 'height'"),
        ({"country": ["DE", "FR"]}, "one value"),
    ):
        with pytest.raises(RequestError, match=message):
            rec.recommend(user_features=bad)


def test_triton_config_lists_every_input(artifact: dict[str, Path]) -> None:
    config = (artifact["triton"] / "recforge" / "config.pbtxt").read_text()
    for name in ("item_ids", "user_idx", "user_age_bucket", "user_country", "user_vector"):
        assert f'name: "{name}"' in config


@pytest.fixture(scope="module")
def server(artifact: dict[str, Path]):
    with serving(artifact["export"], artifact["tmp"]) as (url, _):
        yield url


def test_http_by_user_history_and_kserve_v2(server: str, artifact: dict[str, Path]) -> None:
    from recforge.serve.recommender import Recommender

    rec = Recommender.load(artifact["export"])
    user = next(iter(rec.histories))
    body = requests.post(
        server + "/v1/recommend", json={"user_id": user, "k": 5}, timeout=10
    ).json()
    assert [x["item_id"] for x in body["items"]] == rec.recommend(user_id=user, k=5).items
    body = requests.post(
        server + "/v1/recommend", json={"history": [rec.item_ids[3], "zzz"], "k": 3}, timeout=10
    ).json()
    assert (
        len(body["items"]) == 3
        and body["unknown_history_items"] == ["zzz"]
        and not body["fallback"]
    )
    body = requests.post(
        server + "/v1/recommend",
        json={"user_features": {"country": "Atlantis"}, "k": 3},
        timeout=10,
    ).json()
    assert len(body["items"]) == 3 and body["unknown_user_features"] == ["country='Atlantis'"]
    response = requests.post(
        server + "/v1/recommend", json={"user_features": {"shoe_size": 44}}, timeout=10
    )
    assert response.status_code == 422 and "unknown feature 'shoe_size'" in response.json()["error"]
    assert response.json()["code"] == "invalid_request"

    meta = requests.get(server + "/v2/models/recforge", timeout=10).json()
    assert [t["name"] for t in meta["inputs"]] == rec.input_names
    inputs = [
        {"name": "item_ids", "shape": [2, 3], "datatype": "INT64", "data": [1, 2, 0, 3, 0, 0]},
        {"name": "user_idx", "shape": [2], "datatype": "INT64", "data": [1, 0]},
        {"name": "user_age_bucket", "shape": [2, 1], "datatype": "INT64", "data": [2, -1]},
        {"name": "user_country", "shape": [2, 2], "datatype": "INT64", "data": [1, 3, 0, -1]},
    ]
    out = requests.post(
        server + "/v2/models/recforge/infer", json={"inputs": inputs}, timeout=10
    ).json()["outputs"][0]
    feeds = {t["name"]: np.array(t["data"], dtype=np.int64).reshape(t["shape"]) for t in inputs}
    assert np.allclose(np.array(out["data"]).reshape(out["shape"]), rec.run_model(feeds), atol=1e-5)

    for bad, message in (
        (inputs[:1], "takes exactly"),
        ([*inputs[:2], {**inputs[2], "data": [2, 99]}, inputs[3]], "must lie in"),
        ([*inputs[:1], {**inputs[1], "shape": [1], "data": [1]}, *inputs[2:]], "batch"),
        ([*inputs[:3], {**inputs[3], "datatype": "FP32"}], "expected int64"),
        ([{**inputs[0], "data": [1, 0, 2, 3, 0, 0]}, *inputs[1:]], "right-padded"),
    ):
        response = requests.post(
            server + "/v2/models/recforge/infer", json={"inputs": bad}, timeout=10
        )
        assert response.status_code == 422 and message in response.json()["error"], response.text


def test_triton_http_client_json_and_binary(server: str, artifact: dict[str, Path]) -> None:
    import re

    import tritonclient.http as httpclient

    from recforge.serve.recommender import Recommender

    triton_session(server, Recommender.load(artifact["export"]))
    # The configuration is the one `--triton` wrote for Triton itself.
    config = httpclient.InferenceServerClient(server.removeprefix("http://")).get_model_config(
        "recforge"
    )
    pbtxt = (artifact["triton"] / "recforge" / "config.pbtxt").read_text()
    blocks = re.findall(r'name: "(\w+)"\s+data_type: (\w+)\s+dims: \[ ([-\d, ]+) \]', pbtxt)
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"] + config["output"]] == [
        (name, kind, [int(d) for d in dims.split(",")]) for name, kind, dims in blocks
    ]
    sha = json.loads((artifact["export"] / "manifest.json").read_text())["files"]["model.onnx"]
    assert config["parameters"]["recforge_sha256"]["string_value"] == sha and sha in pbtxt


def test_openapi_names_the_features_and_holds_under_fuzzing(server: str) -> None:
    spec = requests.get(server + "/openapi.json", timeout=10).json()
    features = spec["components"]["schemas"]["RecommendRequest"]["properties"]["user_features"]
    assert features["anyOf"][0]["propertyNames"] == {"enum": ["age_bucket", "country"]}
    infer_input = spec["components"]["schemas"]["InferInput"]["properties"]
    assert infer_input["name"]["enum"] == [
        "item_ids",
        "user_idx",
        "user_age_bucket",
        "user_country",
    ]
    sent = fuzz_openapi(server)
    assert sent["POST /v1/recommend [positive]"] >= 20


def test_int8_export_is_checked_reported_and_served(artifact: dict[str, Path]) -> None:
    from recforge.serve.recommender import Recommender

    tmp, ckpt = artifact["tmp"], str(artifact["ckpt"])
    proc = run(
        "export", "--checkpoint", ckpt, "--out", str(tmp / "int8"), "--quantize", "int8", cwd=tmp
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    q = json.loads((tmp / "int8" / "manifest.json").read_text())["quantization"]
    assert (
        q["weight_type"] == "int8"
        and q["recall@10_vs_float"] >= 0.9
        and q["bytes_int8"] < q["bytes_float"] / 1.5
    )
    assert 0 < q["max_abs_diff_vs_pytorch"] < 0.1, (
        "int8 really changed the graph, not beyond reason"
    )
    quantized, exact = Recommender.load(tmp / "int8"), Recommender.load(artifact["export"])
    user = next(iter(exact.histories))
    overlap = set(quantized.recommend(user_id=user, k=10).items) & set(
        exact.recommend(user_id=user, k=10).items
    )
    assert len(overlap) >= 7
    # The gate: demanding perfect recall fails (this model measures below 1) and leaves nothing.
    proc = run(
        "export",
        "--checkpoint",
        ckpt,
        "--out",
        str(tmp / "int8-strict"),
        "--quantize",
        "int8",
        "--min-recall",
        "1.0",
        cwd=tmp,
    )
    assert proc.returncode == 2 and "int8 quantization lost too much" in proc.stderr, proc.stderr[
        -2000:
    ]
    assert not (tmp / "int8-strict").exists()


def test_checkpoint_of_the_previous_version_still_loads(
    artifact: dict[str, Path], tmp_path: Path
) -> None:
    """Before the single namespace, checkpoints named the module ``trainer.<...>`` and the
    DataModule's batch format by the model family (``model_family``); both are read through the
    family registry."""
    import shutil

    import torch

    from recforge.families import FAMILIES
    from recforge.trainer.checkpoint import TRAINER_STATE
    from recforge.trainer.export.loading import load_checkpoint

    family = FAMILIES["two_tower"]
    old = tmp_path / "old.ckpt"
    shutil.copytree(artifact["ckpt"], old)
    state = torch.load(old / TRAINER_STATE, map_location="cpu", weights_only=False)
    assert state["hyper_parameters"]["_class_path"] == family.module
    assert state["datamodule_hyper_parameters"]["batch_format"] == family.batch_format, (
        "new checkpoints"
    )
    state["hyper_parameters"]["_class_path"] = family.legacy_modules[0]
    state["datamodule_hyper_parameters"].pop("batch_format")
    state["datamodule_hyper_parameters"]["model_family"] = family.name
    torch.save(state, old / TRAINER_STATE)
    loaded = load_checkpoint(old)
    assert loaded.family is family and loaded.datamodule.batch_format == family.batch_format
    fresh = load_checkpoint(artifact["ckpt"]).network.state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in loaded.network.state_dict().items())


def test_explanations_reproduce_a_numpy_hand_computation(artifact: dict[str, Path]) -> None:
    """``explain``: each history item's score is score(full window) - score(window without it),
    recomputed here from the checkpoint's weights in numpy (two_tower_reference.py)."""
    from two_tower_reference import NumpyUserTower

    from recforge.serve.explain import EXPLAIN_TOP
    from recforge.serve.recommender import Recommender
    from recforge.trainer.export.loading import load_checkpoint

    rec = Recommender.load(artifact["export"])
    missing = {spec["name"]: spec.get("missing", []) for spec in rec.inputs[2:]}
    tower = NumpyUserTower(load_checkpoint(artifact["ckpt"]).network, missing)
    history = [3, 17, 42, 17, 8, 120, 55]  # item indexes; 17 twice: removed together
    result = rec.recommend(history=[rec.item_ids[i - 1] for i in history], k=4, explain=True)
    items = rec.item_embeddings.astype(np.float64)
    full = tower(history)
    assert np.allclose([full @ items[rec.index_of[i] - 1] for i in result.items], result.scores)
    for item, because in zip(result.items, result.because):
        v = items[rec.index_of[item] - 1]
        expected = {
            h: full @ v - tower([x for x in history if x != h]) @ v for h in dict.fromkeys(history)
        }
        top = sorted(expected, key=lambda h: -expected[h])[:EXPLAIN_TOP]
        assert [b["item_id"] for b in because] == [rec.item_ids[h - 1] for h in top]
        assert np.allclose([b["score"] for b in because], [expected[h] for h in top], atol=2e-5)
    # Longer histories list EXPLAIN_TOP items; no history, nothing to explain.
    long = rec.recommend(history=rec.item_ids[:12], explain=True)
    assert all(len(b) == EXPLAIN_TOP for b in long.because)
    cold = rec.recommend(user_features={"country": "Atlantis"}, k=3, explain=True)
    assert cold.because == [[], [], []]
    assert rec.recommend(history=[rec.item_ids[2]], k=3).because is None


def test_diversity_zero_is_the_plain_ranking_and_exclusions(artifact: dict[str, Path]) -> None:
    import pyarrow.parquet as pq

    from recforge.serve.recommender import Recommender, RequestError

    rec = Recommender.load(artifact["export"])
    users = [rec.item_ids[7 * u : 7 * u + 8] for u in range(20)]  # histories, by original id
    plain = rec.recommend_batch([{"history": h, "k": 10} for h in users])
    zero = rec.recommend_batch([{"history": h, "k": 10, "diversity": 0.0} for h in users])
    assert [(r.items, r.scores) for r in zero] == [(r.items, r.scores) for r in plain]
    for u, base in zip(users, plain):
        mixed = rec.recommend(history=u, k=10, diversity=0.7)
        assert mixed.items[0] == base.items[0] and len(set(mixed.items)) == 10
        pool = rec.recommend(history=u, k=50).items  # the MMR candidates: top max(50, 5k)
        assert set(mixed.items) <= set(pool) and mixed.items != base.items
    # exclude_categories equals excluding the same items by id; the artifact's values are the
    # prepared data's, decoded.
    items = pq.read_table(artifact["export"] / "items.parquet").to_pydict()
    assert {"category", "tags"} <= set(items)
    category = items["category"][rec.index_of[plain[0].items[0]] - 1][0]
    members = [i for i, c in zip(items["item_id"], items["category"]) if category in c]
    by_category = rec.recommend(history=users[0], k=10, exclude_categories={"category": [category]})
    by_id = rec.recommend(history=users[0], k=10, exclude=members)
    assert by_category.items == by_id.items and not set(by_category.items) & set(members)
    tag = items["tags"][0][0]
    tagged = rec.recommend(history=users[0], k=20, exclude_categories={"tags": [tag, "no-such"]})
    assert not any(tag in items["tags"][rec.index_of[i] - 1] for i in tagged.items)
    for bad, field in (
        ({"exclude_categories": {"colour": ["red"]}}, "exclude_categories.colour"),
        ({"diversity": 1.5}, "diversity"),
        ({"diversity": True}, "diversity"),
        ({"explain": "yes"}, "explain"),
    ):
        with pytest.raises(RequestError) as err:
            rec.recommend_batch([{"history": users[0], **bad}])
        assert err.value.field == field, err.value
