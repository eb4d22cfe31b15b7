"""Logging an exported artifact to its MLflow run and registering it (docs/architecture.md §8, §9).

The ONNX graph is logged with ``mlflow.onnx`` (a hand-written ``TensorSpec`` signature with -1
for the dynamic dims, since an inferred one would fix the example's length —
docs/architecture.md §11), the other artifact files ride along as its ``extra_files``, and the
whole artifact directory is also logged as the run's ``export/`` artifacts. The new model version
gets the configured alias and a ``recforge.artifact`` tag naming that directory, which is what
``recforge serve models:/NAME@ALIAS`` downloads. Names and tags are the artifact contract's
(:mod:`recforge.artifact`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from recforge import artifact
from recforge.artifact import ARTIFACT_TAG, EXPORT_ARTIFACT_PATH

log = logging.getLogger(__name__)


def log_and_register(
    artifact_dir: str | Path,
    tracking_uri: str,
    run_id: str,
    registered_model_name: str | None,
    alias: str | None = "champion",
) -> dict[str, Any]:
    """Log ``artifact_dir`` to run ``run_id``; register it when a name is given. Returns what was
    done."""
    import mlflow
    import onnx
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    artifact_dir = Path(artifact_dir)
    manifest = artifact.read_manifest(artifact_dir)

    def schema(specs: list[dict[str, Any]]) -> Schema:
        return Schema(
            [
                TensorSpec(
                    np.dtype(spec["dtype"]), tuple(artifact.onnx_dims(spec["shape"])), spec["name"]
                )
                for spec in specs
            ]
        )

    inputs, outputs = schema(manifest["inputs"]), schema(manifest["outputs"])
    example = {
        spec["name"]: np.asarray(manifest["input_example"][spec["name"]], dtype=spec["dtype"])
        for spec in manifest["inputs"]
    }
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    extra = [str(artifact_dir / name) for name in manifest["files"] if name != artifact.MODEL] + [
        str(artifact_dir / artifact.MANIFEST)
    ]
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            onnx.load(str(artifact_dir / artifact.MODEL)),
            name="model",
            signature=ModelSignature(inputs=inputs, outputs=outputs),
            input_example=example,
            registered_model_name=registered_model_name,
            onnx_execution_providers=["CPUExecutionProvider"],
            save_as_external_data=False,
            extra_files=extra,
            metadata={
                artifact.MODEL_METADATA_KIND: manifest["kind"],
                artifact.MODEL_METADATA_FILES: manifest["files"],
            },
        )
        mlflow.log_artifacts(str(artifact_dir), EXPORT_ARTIFACT_PATH)
    result: dict[str, Any] = {
        "model_uri": info.model_uri,
        "run_id": run_id,
        "artifact_uri": f"runs:/{run_id}/{EXPORT_ARTIFACT_PATH}",
    }
    if registered_model_name:
        version = info.registered_model_version
        client.set_model_version_tag(
            registered_model_name, str(version), ARTIFACT_TAG, result["artifact_uri"]
        )
        if alias:
            client.set_registered_model_alias(registered_model_name, alias, str(version))
        result.update(
            {
                "registered_model_name": registered_model_name,
                "version": int(version),
                "alias": alias,
            }
        )
        client.set_tag(run_id, artifact.REGISTERED_MODEL_TAG, f"{registered_model_name}/{version}")
        log.info(
            "MLflow: registered %s version %s%s",
            registered_model_name,
            version,
            f" (alias {alias})" if alias else "",
        )
    return result
