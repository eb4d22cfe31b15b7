"""A Triton Inference Server model repository for an exported artifact (onnxruntime backend).

Layout: ``<repo>/<name>/config.pbtxt`` and ``<repo>/<name>/1/model.onnx``. The batch dimension
is left to the model's own dynamic axis (``max_batch_size: 0``, dims ``[-1, -1]``) rather than to
Triton's dynamic batcher, which would need requests of one sequence length to merge.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TRITON_TYPES = {"int64": "TYPE_INT64", "float32": "TYPE_FP32"}


def write_triton_repository(artifact_dir: str | Path, repository: str | Path, name: str = "recforge") -> Path:
    """Write (atomically) the model ``name`` into ``repository``; returns the model directory."""
    artifact_dir, repository = Path(artifact_dir), Path(repository)
    manifest = json.loads((artifact_dir / "manifest.json").read_text())

    def tensors(specs: list[dict]) -> str:
        blocks = []
        for spec in specs:
            dims = ", ".join("-1" if isinstance(d, str) else str(d) for d in spec["shape"])
            blocks.append(f'  {{\n    name: "{spec["name"]}"\n    data_type: {TRITON_TYPES[spec["dtype"]]}\n'
                          f"    dims: [ {dims} ]\n  }}")
        return ",\n".join(blocks)

    config = (f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: 0\n'
              f"input [\n{tensors(manifest['inputs'])}\n]\noutput [\n{tensors(manifest['outputs'])}\n]\n"
              "instance_group [ { kind: KIND_CPU, count: 1 } ]\n"
              f'parameters {{ key: "recforge_sha256" value: {{ string_value: "{manifest["files"]["model.onnx"]}" }} }}\n')
    repository.mkdir(parents=True, exist_ok=True)
    final = repository / name
    tmp = repository / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "1").mkdir(parents=True)
    shutil.copyfile(artifact_dir / "model.onnx", tmp / "1" / "model.onnx")
    (tmp / "config.pbtxt").write_text(config)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
