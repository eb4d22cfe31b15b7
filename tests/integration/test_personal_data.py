"""Personal data for real, through the `recforge` CLI: consent at ingest (opt-out list, consent
column) in both prepare engines, `data forget` with its erasure ledger and `fit` refusing a stale
copy, the export's user stores (none, hashed, full) served, and `forget-artifacts` on a
directory and on a real `mlflow server`'s runs and registered versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from serve_fixtures import run, serving

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "sasrec" / "tiny.yaml")
SECRET = "alice-secret"  # a recognisable raw id: it must appear in no ledger or hashed store


def _raw(tmp: Path) -> Path:
    """60 users x 12 interactions over 40 items, string ids; user 'u7' refuses 3 rows."""
    rng = np.random.default_rng(0)
    users = [SECRET] + [f"u{i}" for i in range(1, 60)]
    rows = [(u, f"i{rng.integers(40)}", t) for u in users for t in range(12)]
    consent = [not (u == "u7" and t < 3) for u, _, t in rows]
    raw = tmp / "raw"
    raw.mkdir()
    pq.write_table(
        pa.table(
            {
                "user_id": [r[0] for r in rows],
                "item_id": [r[1] for r in rows],
                "timestamp": [r[2] for r in rows],
                "consent": consent,
            }
        ),
        raw / "inter.parquet",
    )
    return raw / "inter.parquet"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("personal")
    inter = _raw(tmp)
    (tmp / "optout.txt").write_text("u3\nu4\nnobody\n")
    out = {"tmp": tmp, "inter": inter}
    for engine in ("memory", "duckdb"):
        proc = run(
            "data", "prepare", "--input", str(inter), "--format", "parquet",
            "--out", str(tmp / f"p-{engine}"), "--engine", engine,
            "--opt-out", str(tmp / "optout.txt"), "--consent-col", "consent",
            cwd=tmp,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[engine] = tmp / f"p-{engine}"
    return out


def test_opt_out_and_consent_are_counted_in_both_engines(prepared: dict[str, Path]) -> None:
    manifests = [
        json.loads((prepared[e] / "manifest.json").read_text()) for e in ("memory", "duckdb")
    ]
    m = manifests[0]
    assert m["rows_removed"]["opt_out"] == 24 and m["rows_removed"]["no_consent"] == 3
    assert m["consent"]["opt_out"]["users_excluded"] == 2
    assert m["consent"]["opt_out"]["ids_listed"] == 3
    assert m["consent"]["consent_column"] == {
        "column": "consent",
        "rows_excluded": 3,
        "users_excluded": 0,
        "users_with_rows_excluded": 1,
    }
    assert m["users"] == 58 and m["input_rows"] == 720
    text = (prepared["memory"] / "manifest.json").read_text()
    assert '"u3"' not in text and "nobody" not in text, "the manifest holds no opted-out id"
    for key in ("rows_removed", "consent", "users", "interactions", "split_counts"):
        assert manifests[0][key] == manifests[1][key], key


def test_bad_consent_input_is_one_named_error(prepared: dict[str, Path]) -> None:
    tmp = prepared["tmp"]
    bad = tmp / "bad.parquet"
    table = pq.read_table(prepared["inter"])
    flags = pa.array(["yes"] * (table.num_rows - 1) + ["maybe"])
    pq.write_table(table.set_column(3, "consent", flags), bad)
    for args, words in (
        (["--input", str(bad), "--consent-col", "consent"], ["bad.parquet", "'consent'", "maybe"]),
        (["--input", str(bad), "--consent-col", "agreed"], ["bad.parquet", "'agreed'"]),
        (["--input", str(bad), "--opt-out", str(tmp / "missing.txt")], ["missing.txt"]),
    ):
        proc = run(
            "data", "prepare", "--format", "parquet", "--out", str(tmp / "never"), *args, cwd=tmp
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert all(w in lines[0] for w in words), lines[0]
        assert not (tmp / "never").exists()


def test_forget_rewrites_the_data_and_fit_refuses_a_stale_copy(
    prepared: dict[str, Path],
) -> None:
    tmp = prepared["tmp"]
    data, stale = tmp / "forget-me", tmp / "stale-copy"
    shutil.copytree(prepared["memory"], data)
    shutil.copytree(prepared["memory"], stale)
    (tmp / "erase.txt").write_text(f"{SECRET}\n")
    proc = run("data", "forget", "--users", str(tmp / "erase.txt"), str(data), cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    users = pq.read_table(data / "users.parquet")["user_id"].to_pylist()
    assert SECRET not in users and len(users) == 57
    manifest = json.loads((data / "manifest.json").read_text())
    assert (
        manifest["rows_removed"]["erased"] == 12 and manifest["interactions"] == 720 - 24 - 3 - 12
    )
    assert run("data", "validate", str(data), cwd=tmp).returncode == 0
    ledger = prepared["inter"].parent / "erasures.jsonl"
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert len(entries) == 1 and entries[0]["users_listed"] == 1
    assert SECRET not in ledger.read_text(), "the ledger holds salted hashes, never a raw id"

    # The copy made before the erasure is refused in one line, before any training.
    fit = [
        "fit", "--config", TINY, "--data.data_dir", str(stale), "--mlflow.enabled", "false",
        "--trainer.default_root_dir", str(tmp / "runs"), "--trainer.max_epochs", "1",
    ]  # fmt: skip
    proc = run(*fit, cwd=tmp)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = [x for x in proc.stderr.splitlines() if "error" in x]
    assert len(line) == 1 and "prepared before 1 erasure" in line[0] and str(stale) in line[0]
    # A re-prepare from the same input applies the ledger; `forget` without --users, the copy.
    proc = run(
        "data", "prepare", "--input", str(prepared["inter"]), "--format", "parquet",
        "--out", str(tmp / "again"), "--engine", "duckdb", cwd=tmp,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((tmp / "again" / "manifest.json").read_text())
    assert again["rows_removed"]["erased"] == 12 and again["erasure_ledger"]["users_excluded"] == 1
    assert run("data", "forget", str(stale), cwd=tmp).returncode == 0
    assert SECRET not in pq.read_table(stale / "users.parquet")["user_id"].to_pylist()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SASRec (one epoch) on its own data, exported with each user store."""
    tmp = tmp_path_factory.mktemp("stores")
    inter = _raw(tmp)
    proc = run(
        "data", "prepare", "--input", str(inter), "--format", "parquet", "--out",
        str(tmp / "data"), cwd=tmp,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run(
        "fit", "--config", TINY, "--data.data_dir", str(tmp / "data"), "--mlflow.enabled", "false",
        "--trainer.default_root_dir", str(tmp / "runs"), "--trainer.logger.init_args.save_dir",
        str(tmp / "runs"), "--trainer.max_epochs", "1", "--test_after_fit", "false", cwd=tmp,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp / "runs" / "sasrec-tiny" / "version_0" / "checkpoints" / "last.ckpt"
    out = {"tmp": tmp}
    for store in ("none", "hashed", "full"):
        proc = run(
            "export", "--checkpoint", str(ckpt), "--out", str(tmp / store), "--user-store", store,
            cwd=tmp,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[store] = tmp / store
    return out


def test_user_stores_serve_alike_and_none_needs_the_history(trained: dict[str, Path]) -> None:
    from recforge.serve.recommender import NoUserStoreError, Recommender

    full, hashed, none = (Recommender.load(trained[s]) for s in ("full", "hashed", "none"))
    assert not (trained["none"] / "users.parquet").exists()
    keys = pq.read_table(trained["hashed"] / "users.parquet")
    assert SECRET not in keys["user_id"].to_pylist()
    assert max(len(h) for h in keys["history"].to_pylist()) <= hashed.max_len
    # Histories (12 items) fit the model's 20: a hashed store answers exactly as the full one.
    for user in (SECRET, "u1", "u30"):
        a, b = full.recommend(user_id=user, k=10), hashed.recommend(user_id=user, k=10)
        assert a.items == b.items and np.allclose(a.scores, b.scores)
    history = [full.item_ids[i - 1] for i in full.histories[SECRET]]
    assert none.recommend(history=history, k=10).items == full.recommend(user_id=SECRET, k=10).items
    with pytest.raises(NoUserStoreError, match="without a user store"):
        none.recommend(user_id=SECRET, k=10)
    with serving(trained["none"], trained["tmp"]) as (url, _):
        answer = requests.post(url + "/v1/recommend", json={"user_id": SECRET, "k": 3}, timeout=10)
        assert answer.status_code == 422 and answer.json()["field"] == "user_id"
        assert "send 'history'" in answer.json()["error"] and SECRET not in answer.text
        ok = requests.post(url + "/v1/recommend", json={"history": history, "k": 3}, timeout=10)
        assert ok.status_code == 200 and len(ok.json()["items"]) == 3


def test_forget_artifacts_in_a_directory_and_in_mlflow(trained: dict[str, Path]) -> None:
    from mlflow import MlflowClient
    from test_mlflow import start_server, stop_server

    from recforge.serve.recommender import Recommender, UnknownUserError
    from recforge.trainer.tracking.registry import log_and_register

    tmp = trained["tmp"]
    (tmp / "erase.txt").write_text(f"{SECRET}\n")
    for store in ("hashed", "full"):
        copy = tmp / f"forget-{store}"
        shutil.copytree(trained[store], copy)
        proc = run("forget-artifacts", "--users", str(tmp / "erase.txt"), str(copy), cwd=tmp)
        assert proc.returncode == 0 and '"users_removed": 1' in proc.stdout, proc.stderr[-2000:]
        rec = Recommender.load(copy)  # the rewritten artifact still verifies
        with pytest.raises(UnknownUserError):
            rec.recommend(user_id=SECRET, k=5)
        assert rec.recommend(user_id="u1", k=5).items

    root = tmp / "mlflow"
    root.mkdir()
    proc, url = start_server(root)
    try:
        client = MlflowClient(url)
        run_id = client.create_run(client.create_experiment("personal")).info.run_id
        log_and_register(trained["full"], url, run_id, "personal-model", "champion")
        proc_forget = run(
            "forget-artifacts", "--users", str(tmp / "erase.txt"), "--mlflow-tracking-uri", url,
            cwd=tmp,
        )  # fmt: skip
        assert proc_forget.returncode == 0, proc_forget.stderr[-2000:]
        report = json.loads(proc_forget.stdout.strip().splitlines()[-1])
        assert {c["where"].split()[0] for c in report["copies"]} == {"run", "model"}, report
        assert all(c["users_removed"] == 1 for c in report["copies"]), report
        served = Recommender.load(
            __import__("recforge.serve.artifact", fromlist=["x"]).resolve_source(
                "models:/personal-model@champion", url
            )
        )
        with pytest.raises(UnknownUserError):
            served.recommend(user_id=SECRET, k=5)
        import mlflow

        model_copy = Path(mlflow.artifacts.download_artifacts(
            client.get_model_version("personal-model", "1").source, tracking_uri=url
        ))  # fmt: skip
        for users in model_copy.rglob("users.parquet"):
            assert SECRET not in pq.read_table(users)["user_id"].to_pylist()
    finally:
        stop_server(proc)
