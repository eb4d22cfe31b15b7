"""Shared test setup: paths, the `gpu` marker's skip rule."""

from __future__ import annotations

from pathlib import Path

import pytest
from s3_server import s3_bucket, s3_server  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"{SHARED_DATA} not present (the shared MovieLens files sit beside the repository)"
        )
    return SHARED_DATA


@pytest.fixture(autouse=True)
def hermetic_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs go to a sqlite store in each test's working directory, never to a server from the
    environment; and ``mlflow.set_tracking_uri`` (which writes os.environ) cannot leak between
    tests."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        # setenv first, so that teardown deletes a value a test's mlflow.set_tracking_uri() wrote.
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
