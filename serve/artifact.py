"""Finding an exported artifact (a path, or one recforge registered in MLflow) and reading it.

The checks themselves (format version, kind, every file's sha256) are the artifact contract's,
:mod:`recforge.artifact`; they are re-exported here for the serving layer. Nothing here imports
torch.
"""

from __future__ import annotations

from pathlib import Path

from recforge.artifact import ARTIFACT_TAG, ArtifactError, read_verified_manifest

__all__ = ["ArtifactError", "read_verified_manifest", "resolve_source"]


def resolve_source(source: str, tracking_uri: str | None = None) -> Path:
    """A local artifact dir for ``source``: a path, or ``models:/NAME@ALIAS`` /
    ``models:/NAME/VERSION`` (downloaded from the run artifact that recforge registered), or
    ``runs:/RUN/export``."""
    if source.startswith(("models:/", "runs:/")):
        import mlflow

        uri = source
        if source.startswith("models:/"):
            uri = _models_to_runs(source, tracking_uri)
        try:
            return Path(mlflow.artifacts.download_artifacts(uri, tracking_uri=tracking_uri))
        except Exception as exc:
            raise ArtifactError(
                f"{source}: cannot download {uri} ({type(exc).__name__}: {str(exc)[:300]})"
            ) from None
    return Path(source)


def _models_to_runs(uri: str, tracking_uri: str | None) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    spec = uri[len("models:/") :]
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = spec.rpartition("/")
            version = client.get_model_version(name, number)
    except Exception as exc:
        raise ArtifactError(
            f"{uri}: not found in the model registry ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    artifact = (version.tags or {}).get(ARTIFACT_TAG)
    if not artifact:
        raise ArtifactError(
            f"{uri}: version {version.version} has no {ARTIFACT_TAG} tag "
            "(it was not registered by recforge)"
        )
    return artifact
