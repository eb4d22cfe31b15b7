"""User control and explanations on real data: a tiny SASRec trained one epoch on MovieLens-100k
(genres as the item feature ``class``), exported and served. The accuracy/diversity trade-off of
``diversity`` is monotone (benchmarks/diversity_curve.py), genres can be excluded, SASRec's
leave-one-out explanations match the raw ONNX model, and HTTP answers the fields and 4xx."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import requests
from serve_fixtures import run, serving

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    shared = REPO.parent / "shared" / "data" / "ml-100k"
    if not shared.is_dir():
        pytest.skip(f"{shared} not present (the shared MovieLens files sit beside the repository)")
    tmp = tmp_path_factory.mktemp("ml100k-control")
    data, root = tmp / "data", tmp / "run"
    proc = run(
        *("data", "prepare", "--input", str(shared), "--format", "recbole"),
        *("--item-feature-columns", "class", "--user-feature-columns", "age", "--out", str(data)),
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run(
        *("fit", "--config", str(REPO / "configs" / "sasrec" / "tiny.yaml")),
        *("--data.data_dir", str(data), "--trainer.max_epochs", "1"),
        *(
            "--trainer.default_root_dir",
            str(root),
            "--trainer.logger.init_args.save_dir",
            str(root),
        ),
        *("--mlflow.enabled", "false", "--test_after_fit", "false"),
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = root / "sasrec-tiny" / "version_0" / "checkpoints" / "last.ckpt"
    proc = run("export", "--checkpoint", str(ckpt), "--out", str(tmp / "export"), cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "data": data, "export": tmp / "export"}


def test_accuracy_diversity_trade_off_is_monotone(ml100k: dict[str, Path]) -> None:
    spec = importlib.util.spec_from_file_location(
        "diversity_curve", REPO / "benchmarks" / "diversity_curve.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.curve(str(ml100k["export"]), str(ml100k["data"]), 10, [0, 0.25, 0.5, 0.75, 1], 0)
    ild = [r["ild"] for r in rows]
    assert rows[0]["users"] == 943 and rows[0]["changed"] == 0.0
    assert all(a < b for a, b in zip(ild, ild[1:])), ild  # intra-list similarity decreases
    assert rows[-1]["ndcg"] < rows[0]["ndcg"], rows  # and it costs accuracy
    assert bench.main([str(ml100k["export"]), str(ml100k["data"]), "--max-users", "50"]) == 0


def test_genres_are_excluded_and_sasrec_explanations_are_leave_one_out(
    ml100k: dict[str, Path],
) -> None:
    from recforge.serve.explain import EXPLAIN_TOP
    from recforge.serve.recommender import Recommender

    rec = Recommender.load(ml100k["export"])
    drama = rec.categories.members["class"]["Drama"]
    assert rec.categories.names == ["class"] and 1 in rec.categories.members["class"]["Comedy"]
    seen = [50, 181, 100, 258, 1]  # Star Wars, Return of the Jedi, Fargo, Contact, Toy Story
    plain = rec.recommend(history=seen, k=20)
    assert any(rec.index_of[i] in drama for i in plain.items), "Drama is popular: the test bites"
    kept = rec.recommend(history=seen, k=20, exclude_categories={"class": ["Drama"]})
    assert len(kept.items) == 20 and not any(rec.index_of[i] in drama for i in kept.items)
    # Leave-one-out by hand through the raw model: one row per distinct history item.
    history = [50, 181, 100, 50, 7]  # original ids (= indexes here), 50 twice
    result = rec.recommend(history=history, k=3, explain=True)
    full = rec.encode_histories(np.array([history], dtype=np.int64))[0]
    for item, because in zip(result.items, result.because):
        v = rec.item_embeddings[rec.index_of[item] - 1]
        drop = {
            h: float(full @ v)
            - float(rec.encode_histories(np.array([[x for x in history if x != h]]))[0] @ v)
            for h in dict.fromkeys(history)
        }
        top = sorted(drop, key=lambda h: -drop[h])[:EXPLAIN_TOP]
        assert [b["item_id"] for b in because] == top
        assert np.allclose([b["score"] for b in because], [drop[h] for h in top], atol=1e-4)


def test_http_fields_and_errors(ml100k: dict[str, Path]) -> None:
    from recforge.serve.recommender import Recommender

    rec = Recommender.load(ml100k["export"])
    body = {"history": [50, 181, 100], "k": 5, "diversity": 0.5, "explain": True}
    body["exclude_categories"] = {"class": ["Drama", 1995]}
    with serving(ml100k["export"], ml100k["tmp"]) as (url, _):
        answer = requests.post(url + "/v1/recommend", json=body, timeout=10).json()
        expected = rec.recommend(**body).as_dict()
        assert [x["item_id"] for x in answer["items"]] == [x["item_id"] for x in expected["items"]]
        assert [x["because"] for x in answer["items"]] == [x["because"] for x in expected["items"]]
        for bad, status, field in (
            ({**body, "exclude_categories": {"genre": ["Drama"]}}, 422, "exclude_categories.genre"),
            ({**body, "diversity": -0.1}, 422, "diversity"),
            ({**body, "explain": 1}, 422, "explain"),
        ):
            response = requests.post(url + "/v1/recommend", json=bad, timeout=10)
            assert response.status_code == status, response.text
            assert (
                response.json()["field"] == field and response.json()["code"] == "invalid_request"
            )
        batch = {"requests": [body, {**body, "exclude_categories": {"genre": ["x"]}}]}
        response = requests.post(url + "/v1/recommend:batch", json=batch, timeout=10)
        assert response.status_code == 422
        assert response.json()["field"] == "requests.1.exclude_categories.genre"
        assert "unknown item feature 'genre'" in response.json()["error"]
