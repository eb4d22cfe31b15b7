"""The HNSW index built at export (`recforge export --ann hnsw`, docs/architecture.md §9-§10):
written into the artifact and listed in the manifest with its measured recall, loaded by the
server instead of rebuilt, and agreeing with exact search on most users."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from serve_fixtures import run

from recforge import artifact
from recforge.artifact import ArtifactError
from recforge.serve.recommender import Recommender

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "sasrec" / "tiny.yaml")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SASRec (a few steps), exported with --ann hnsw and with the default (auto)."""
    tmp = tmp_path_factory.mktemp("ann")
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
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = str(root / "sasrec-tiny" / "version_0" / "checkpoints" / "last.ckpt")
    # "full": the recall test requests users by the raw ids it reads from users.parquet.
    proc = run(
        "export",
        "--checkpoint",
        ckpt,
        "--out",
        str(tmp / "hnsw"),
        "--ann",
        "hnsw",
        "--user-store",
        "full",
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HNSW index (M 32, efConstruction 80)" in proc.stdout, proc.stdout
    proc = run(
        "export", "--checkpoint", ckpt, "--out", str(tmp / "auto"), "--user-store", "full", cwd=tmp
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "hnsw": tmp / "hnsw", "auto": tmp / "auto"}


def test_export_writes_the_index_and_its_recall(exported: dict[str, Path]) -> None:
    manifest = json.loads((exported["hnsw"] / artifact.MANIFEST).read_text())
    assert manifest["format"] == artifact.FORMAT_VERSION
    assert artifact.ANN_INDEX in manifest["files"]  # covered by the sha256 list
    assert manifest["files"][artifact.ANN_INDEX] == artifact.file_sha256(
        exported["hnsw"] / artifact.ANN_INDEX
    )
    ann = manifest["ann"]
    assert ann["kind"] == "hnsw"
    assert (ann["m"], ann["ef_construction"], ann["ef_search"]) == (
        artifact.HNSW_M,
        artifact.HNSW_EF_CONSTRUCTION,
        artifact.HNSW_EF_SEARCH,
    )
    assert 0.0 <= ann["recall@10_vs_exact"] <= 1.0
    assert ann["recall@10_vs_exact"] >= 0.9  # 200 items, efSearch 512: close to exact
    assert ann["query_source"] == "users" and 0 < ann["queries"] <= artifact.ANN_RECALL_QUERIES
    assert ann["build_seconds"] >= 0
    # Below the auto threshold the default export writes no index, as before.
    auto = json.loads((exported["auto"] / artifact.MANIFEST).read_text())
    assert auto["ann"] is None and artifact.ANN_INDEX not in auto["files"]
    assert not (exported["auto"] / artifact.ANN_INDEX).exists()


def test_serve_loads_the_saved_index_and_agrees_with_exact(
    exported: dict[str, Path], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recforge.serve import ann as ann_module

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the server rebuilt the HNSW index instead of loading it")

    with caplog.at_level(logging.INFO, logger="recforge.serve.recommender"):
        monkeypatch.setattr(ann_module.HNSWIndex, "__init__", no_build)
        approx = Recommender.load(exported["hnsw"], index="hnsw")
        monkeypatch.undo()
    assert approx.ann is not None
    assert approx.ann.source == str(exported["hnsw"] / artifact.ANN_INDEX)
    assert "HNSW index loaded from the artifact" in caplog.text
    # Item vectors are memory-mapped, read-only.
    assert isinstance(approx.item_embeddings, np.memmap)
    assert not approx.item_embeddings.flags.writeable
    exact = Recommender.load(exported["hnsw"], index="exact")
    assert exact.ann is None
    users = list(exact.histories)[:100]
    overlap = [
        len(
            set(approx.recommend(user_id=u, k=10).items)
            & set(exact.recommend(user_id=u, k=10).items)
        )
        / 10
        for u in users
    ]
    assert np.mean(overlap) >= 0.9, np.mean(overlap)
    # An artifact without an index still builds one at start when asked (today's behaviour).
    built = Recommender.load(exported["auto"], index="hnsw")
    assert built.ann is not None and built.ann.source == "built"


def test_a_tampered_index_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(exported["hnsw"], bad)
    data = bytearray((bad / artifact.ANN_INDEX).read_bytes())
    data[-1] ^= 0xFF
    (bad / artifact.ANN_INDEX).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"item_index\.hnsw\.faiss: sha256 .* does not match"):
        Recommender.load(bad, index="hnsw")
