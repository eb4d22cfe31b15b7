"""onnxruntime against PyTorch on the same random inputs: the export's parity gate, and the
loop the int8 check (:mod:`recforge.trainer.export.quantize`) shares with it.

Parity: several batch sizes and lengths; max |diff| of the user vector <= ``tolerance`` and
identical top-10 over the catalogue, or the export fails naming the measured difference.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recforge.artifact import USER_VECTOR
from recforge.trainer.export.errors import ExportError

PARITY_SHAPES = ((1, 1), (3, 7), (16, 50), (64, 200))
"""(batch, length) pairs the parity gate runs; lengths above the model's max_len are clipped."""


@dataclass
class ParityCase:
    batch: int
    length: int
    expected: np.ndarray
    """PyTorch's user vectors (B, D)."""
    outputs: dict[str, np.ndarray]
    """Each graph's user vectors (B, D), by the name it was given."""


def onnx_vs_pytorch(
    encoder: nn.Module, graphs: dict[str, Path], cases: tuple[tuple[int, int], ...], seed: int
) -> Iterator[ParityCase]:
    """For each (batch, length) of ``cases``: random inputs (drawn in order from ``seed``), the
    encoder's user vectors and those of each ONNX graph in ``graphs``, run in onnxruntime."""
    import onnxruntime as ort

    sessions = {
        name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for name, path in graphs.items()
    }
    generator = torch.Generator().manual_seed(seed)
    for batch, length in cases:
        length = min(length, encoder.max_length)
        inputs = encoder.random_inputs(batch, length, generator)
        feeds = {name: x.numpy() for name, x in zip(encoder.names, inputs)}
        with torch.no_grad():
            expected = encoder(*inputs).numpy()
        outputs = {name: session.run([USER_VECTOR], feeds)[0] for name, session in sessions.items()}
        yield ParityCase(batch, length, expected, outputs)


def parity(
    encoder: nn.Module,
    onnx_path: Path,
    item_embeddings: np.ndarray,
    tolerance: float,
    seed: int = 0,
) -> dict[str, Any]:
    """onnxruntime vs PyTorch on random inputs; raises :class:`ExportError` past ``tolerance``."""
    worst, shapes = 0.0, []
    for case in onnx_vs_pytorch(encoder, {"onnx": onnx_path}, PARITY_SHAPES, seed):
        got = case.outputs["onnx"]
        diff = float(np.abs(case.expected - got).max())
        worst = max(worst, diff)
        top_expected = top_k(case.expected @ item_embeddings.T, 10)
        same_top = bool((top_expected == top_k(got @ item_embeddings.T, 10)).all())
        shapes.append(
            {
                "batch": case.batch,
                "length": case.length,
                "max_abs_diff": diff,
                "same_top10": same_top,
            }
        )
        if not np.isfinite(diff) or diff > tolerance or not same_top:
            raise ExportError(
                f"ONNX parity failed at batch={case.batch}, length={case.length}: "
                f"max |diff| of user_vector {diff:.3g} (tolerance {tolerance:g}), "
                f"identical top-10: {same_top}"
            )
    return {"max_abs_diff": worst, "tolerance": tolerance, "cases": shapes}


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    # Stable order (ties by index) so equal scores cannot flip the comparison.
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]
