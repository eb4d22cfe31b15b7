"""`recforge export --quantize int8`: onnxruntime dynamic int8 quantization of the user encoder.

Weights of MatMul/Gemm/Gather become int8 (activations are quantized on the fly), which shrinks
the graph about 4x and speeds up its matrix products on CPUs with int8 instructions. The float
graph has passed the parity gate first; the int8 graph is then checked on the same kind of
random inputs (:func:`recforge.trainer.export.parity.onnx_vs_pytorch`) against PyTorch (max
|diff| of the user vector, reported: int8 cannot meet the float tolerance) and against the
float graph by recall@10 of the top-10 items over the whole catalogue. Whether that recall is
good enough is the caller's decision (``recforge export --min-recall``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from recforge.trainer.export.parity import onnx_vs_pytorch

RECALL_K = 10


@dataclass
class Int8Quantization:
    report: dict[str, Any]
    """The figures recorded as the manifest's ``quantization``."""
    lowest_recall: float
    """Recall@10 against the float graph of the worst parity case."""
    max_abs_diff: float
    """Max |diff| of the user vector against PyTorch over every case."""


def quantize_int8(
    float_path: Path,
    out_path: Path,
    encoder: nn.Module,
    item_embeddings: np.ndarray,
    cases: tuple[tuple[int, int], ...],
    seed: int = 1,
) -> Int8Quantization:
    """Write the int8 graph of ``float_path`` to ``out_path`` and measure it on ``cases``."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    # ORT's pre-processing (shape inference, graph fusion) lets the quantizer see every MatMul.
    prepared = out_path.with_name(f"{out_path.stem}.pre.onnx")
    quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
    try:
        quantize_dynamic(str(prepared), str(out_path), weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)
    worst, recalls, per_case = 0.0, [], []
    k = min(RECALL_K, item_embeddings.shape[0])
    for case in onnx_vs_pytorch(encoder, {"float": float_path, "int8": out_path}, cases, seed):
        diff = float(np.abs(case.outputs["int8"] - case.expected).max())
        top = {
            name: np.argpartition(-(v @ item_embeddings.T), k - 1, axis=1)[:, :k]
            for name, v in case.outputs.items()
        }
        recall = float(
            np.mean([len(set(a) & set(b)) / k for a, b in zip(top["float"], top["int8"])])
        )
        worst = max(worst, diff)
        recalls.append(recall)
        per_case.append(
            {
                "batch": case.batch,
                "length": case.length,
                "max_abs_diff": diff,
                f"recall@{k}_vs_float": recall,
            }
        )
    report = {
        "type": "dynamic",
        "weight_type": "int8",
        "max_abs_diff_vs_pytorch": worst,
        f"recall@{RECALL_K}_vs_float": float(np.mean(recalls)),
        "bytes_float": float_path.stat().st_size,
        "bytes_int8": out_path.stat().st_size,
        "cases": per_case,
    }
    return Int8Quantization(report, min(recalls), worst)
