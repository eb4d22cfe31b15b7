"""A Triton Inference Server model repository for an exported artifact (onnxruntime backend).

Layout: ``<repo>/<name>/config.pbtxt`` and ``<repo>/<name>/1/model.onnx``. The batch dimension
is left to the model's own dynamic axis (``max_batch_size: 0``, dims ``[-1, -1]``) rather than to
Triton's dynamic batcher, which would need requests of one sequence length to merge.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from recforge import artifact
from recforge.atomic import atomic_directory

TRITON_TYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32"}


def write_triton_repository(
    artifact_dir: str | Path, repository: str | Path, name: str = "recforge"
) -> Path:
    """Write (atomically) the model ``name`` into ``repository``; returns the model directory."""
    artifact_dir, repository = Path(artifact_dir), Path(repository)
    manifest = artifact.read_manifest(artifact_dir)

    def tensors(specs: list[dict]) -> str:
        blocks = []
        for spec in specs:
            dims = ", ".join(str(d) for d in artifact.onnx_dims(spec["shape"]))
            blocks.append(
                f'  {{\n    name: "{spec["name"]}"\n'
                f"    data_type: {TRITON_TYPES[spec['dtype']]}\n"
                f"    dims: [ {dims} ]\n  }}"
            )
        return ",\n".join(blocks)

    config = (
        f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 0\n'
        f"input [\n{tensors(manifest['inputs'])}\n]\n"
        f"output [\n{tensors(manifest['outputs'])}\n]\n"
        "instance_group [ { kind: KIND_CPU, count: 1 } ]\n"
        f'parameters {{ key: "{artifact.TRITON_SHA256_PARAMETER}" value: {{ string_value: '
        f'"{manifest["files"][artifact.MODEL]}" }} }}\n'
    )
    final = repository / name
    # The repository's other models stay; this one is replaced whole.
    with atomic_directory(final, overwrite=True) as tmp:
        (tmp / artifact.TRITON_VERSION).mkdir()
        shutil.copyfile(
            artifact_dir / artifact.MODEL, tmp / artifact.TRITON_VERSION / artifact.MODEL
        )
        (tmp / artifact.TRITON_CONFIG).write_text(config)
    return final
