"""Reading an exported artifact directory (DESIGN §9) and refusing a damaged one.

Every file listed in ``manifest.json`` must be present and match its sha256; the manifest must
name a kind this version serves. Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recforge.data.readers import file_sha256

SUPPORTED_FORMAT = 1
SUPPORTED_KINDS = ("sasrec", "two_tower")
REQUIRED_FILES = ("model.onnx", "item_embeddings.npy", "items.parquet")


class ArtifactError(RuntimeError):
    """The artifact is missing, incomplete, tampered with or of an unknown kind."""


def read_verified_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest of ``directory`` after checking every file's sha256."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: not a directory (expected an artifact written by `recforge export`)")
    if not path.is_file():
        raise ArtifactError(f"{directory}: manifest.json is missing; not an artifact of `recforge export`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != SUPPORTED_FORMAT:
        raise ArtifactError(f"{path}: format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                            f"expected {SUPPORTED_FORMAT}")
    if manifest.get("kind") not in SUPPORTED_KINDS:
        raise ArtifactError(f"{path}: kind {manifest.get('kind')!r} is not served (expected one of {SUPPORTED_KINDS})")
    files = manifest.get("files")
    if not isinstance(files, dict) or any(name not in files for name in REQUIRED_FILES):
        raise ArtifactError(f"{path}: 'files' must list sha256s of {', '.join(REQUIRED_FILES)}")
    for name, expected in files.items():
        file = directory / name
        if Path(name).name != name:
            raise ArtifactError(f"{path}: file name {name!r} is not a plain name")
        if not file.is_file():
            raise ArtifactError(f"{directory}: {name} is missing (listed in manifest.json); the artifact is incomplete")
        actual = file_sha256(file)
        if actual != expected:
            raise ArtifactError(f"{file}: sha256 {actual[:16]}... does not match the manifest's {str(expected)[:16]}...; "
                                "the file was modified or damaged after export — refusing to serve it")
    return manifest


def resolve_source(source: str, tracking_uri: str | None = None) -> Path:
    """A local artifact dir for ``source``: a path, or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``
    (downloaded from the run artifact that recforge registered), or ``runs:/RUN/export``."""
    if source.startswith(("models:/", "runs:/")):
        import mlflow

        uri = source
        if source.startswith("models:/"):
            uri = _models_to_runs(source, tracking_uri)
        try:
            return Path(mlflow.artifacts.download_artifacts(uri, tracking_uri=tracking_uri))
        except Exception as exc:
            raise ArtifactError(f"{source}: cannot download {uri} ({type(exc).__name__}: {str(exc)[:300]})") from None
    return Path(source)


def _models_to_runs(uri: str, tracking_uri: str | None) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    spec = uri[len("models:/"):]
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = spec.rpartition("/")
            version = client.get_model_version(name, number)
    except Exception as exc:
        raise ArtifactError(f"{uri}: not found in the model registry ({type(exc).__name__}: {str(exc)[:200]})") from None
    artifact = (version.tags or {}).get("recforge.artifact")
    if not artifact:
        raise ArtifactError(f"{uri}: version {version.version} has no recforge.artifact tag "
                            "(it was not registered by recforge)")
    return artifact
