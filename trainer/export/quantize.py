"""`recforge export --quantize int8`: onnxruntime dynamic int8 quantization of the user encoder.

Weights of MatMul/Gemm/Gather become int8 (activations are quantized on the fly), which shrinks
the graph about 4x and speeds up its matrix products on CPUs with int8 instructions. The float
graph has passed the parity gate first; the int8 graph is then checked on the same random inputs
against PyTorch (max |diff| of the user vector, reported: int8 cannot meet the float tolerance)
and against the float graph by recall@10 of the top-10 items over the whole catalogue, which
must reach ``min_recall`` or the export fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

RECALL_K = 10


def quantize_int8(float_path: Path, out_path: Path, encoder: nn.Module, item_embeddings: np.ndarray,
                  cases: tuple[tuple[int, int], ...], min_recall: float, seed: int = 1) -> dict[str, Any]:
    """Write the int8 graph of ``float_path`` to ``out_path``; return its figures (raises
    ``recforge.trainer.export.onnx_export.ExportError`` when recall@10 against the float graph is below ``min_recall``)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    from recforge.trainer.export.onnx_export import ExportError

    # ORT's pre-processing (shape inference, graph fusion) lets the quantizer see every MatMul.
    prepared = out_path.with_name(f"{out_path.stem}.pre.onnx")
    quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
    try:
        quantize_dynamic(str(prepared), str(out_path), weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)
    sessions = {name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                for name, path in (("float", float_path), ("int8", out_path))}
    generator = torch.Generator().manual_seed(seed)
    worst, recalls, per_case = 0.0, [], []
    for batch, length in cases:
        length = min(length, encoder.max_length)
        inputs = encoder.random_inputs(batch, length, generator)
        feeds = {name: x.numpy() for name, x in zip(encoder.names, inputs)}
        with torch.no_grad():
            expected = encoder(*inputs).numpy()
        vectors = {name: s.run(["user_vector"], feeds)[0] for name, s in sessions.items()}
        diff = float(np.abs(vectors["int8"] - expected).max())
        k = min(RECALL_K, item_embeddings.shape[0])
        top = {name: np.argpartition(-(v @ item_embeddings.T), k - 1, axis=1)[:, :k] for name, v in vectors.items()}
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top["float"], top["int8"])]))
        worst = max(worst, diff)
        recalls.append(recall)
        per_case.append({"batch": batch, "length": length, "max_abs_diff": diff, f"recall@{k}_vs_float": recall})
    report = {"type": "dynamic", "weight_type": "int8", "max_abs_diff_vs_pytorch": worst,
              f"recall@{RECALL_K}_vs_float": float(np.mean(recalls)), "min_recall": min_recall,
              "bytes_float": float_path.stat().st_size, "bytes_int8": out_path.stat().st_size, "cases": per_case}
    if not np.isfinite(worst) or min(recalls) < min_recall:
        raise ExportError(f"int8 quantization lost too much: recall@{RECALL_K} against the float model "
                          f"{min(recalls):.3f} < {min_recall} (max |diff| of user_vector {worst:.3g}); "
                          "export without --quantize, or lower --min-recall")
    return report
