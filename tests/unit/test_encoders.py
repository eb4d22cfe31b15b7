"""recforge.trainer.export.encoders: the padded-tensor user encoders compute what the TorchRec
models compute (two-tower with hashed user ids, list and numeric user features; SASRec), and
export to ONNX with dynamic batch, length and feature widths that onnxruntime reproduces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recforge.models.sasrec import SASRec, SASRecConfig
from recforge.models.towers import TowerConfig
from recforge.models.two_tower import TwoTower, TwoTowerConfig
from recforge.trainer.export.encoders import SASRecUserEncoder, TwoTowerUserEncoder
from recforge.trainer.export.errors import ExportError
from recforge.trainer.export.parity import parity
from recforge.trainer.export.writing import write_onnx

N, H = 40, 6


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _two_tower() -> TwoTower:
    torch.manual_seed(0)
    config = TwoTowerConfig(
        num_items=N,
        num_users=0,
        dim=16,
        out_dim=8,
        feature_dim=4,
        history_len=H,
        use_user_id=True,
        user_id_dim=4,
        user_id_hash_buckets=7,
        pooling="learned",
        pooling_heads=2,
        item_tower=TowerConfig([16], 0.0),
        user_tower=TowerConfig([16], 0.0),
        user_feature_cardinalities={"country": 5, "tags": 9},
        user_numeric_features=["age", "spend"],
    )
    model = TwoTower(config).eval()
    model.set_user_feature_stats(np.array([[20.0, 3.0], [40.0, 300.0], [60.0, 0.0]]))
    with torch.no_grad():  # random, not near-zero, position logits so pooling order matters
        model.user_tower.pooling.position_logits.normal_()
    return model


def _users() -> dict[str, Any]:
    return {
        "history": [[3, 4, 5], [7], [1, 2, 3, 4, 5, 6], [9, 9]],
        "user_id": [11, 12, 13, 0],
        "country": [[2], [0], [4], []],  # the last user has no code: a zero (mean of nothing) bag
        "tags": [[1, 8], [], [3], [2, 2, 5]],
        "dense": [[30.0, 5.0], [0.0, 0.0], [70.0, 1e4], [25.0, -3.0]],
    }


def _kjt(u: dict[str, Any]) -> KeyedJaggedTensor:
    keys = ["history", "user_id", "user_country", "user_tags"]
    rows = [u["history"], [[x] for x in u["user_id"]], u["country"], u["tags"]]
    values = [v for column in rows for r in column for v in r]
    lengths = [len(r) for column in rows for r in column]
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int32),
        stride=len(u["history"]),
    )


def _padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64)


def _encoder_inputs(u: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    return (
        _padded(u["history"], 0),
        torch.tensor(u["user_id"]),
        _padded(u["country"], -1),
        _padded(u["tags"], -1),
        torch.tensor(u["dense"], dtype=torch.float32),
    )


def test_two_tower_encoder_matches_the_torchrec_model() -> None:
    model = _two_tower()
    encoder = TwoTowerUserEncoder(model).eval()
    u = _users()
    dense = torch.tensor(u["dense"])
    with torch.no_grad():
        expected = model.user_vectors(_kjt(u), dense)
        got = encoder(*_encoder_inputs(u))
    # The TorchRec path hashes every id, 0 included; the encoder treats user_idx 0 as "unknown"
    # (zero id embedding), so only rows with a real id must agree.
    assert torch.allclose(got[:3], expected[:3], atol=1e-6)
    assert not torch.allclose(got[3], expected[3], atol=1e-3)
    # Width of the padded history does not matter (pooling weighs by recency, not position).
    wide = list(_encoder_inputs(u))
    wide[0] = torch.nn.functional.pad(wide[0], (0, H - wide[0].shape[1]))
    with torch.no_grad():
        assert torch.allclose(encoder(*wide), got, atol=1e-6)
    assert np.allclose(
        encoder.item_vectors(),
        model.item_vectors(torch.arange(1, N + 1)).detach().numpy(),
        atol=1e-6,
    )


def test_two_tower_encoder_exports_with_dynamic_widths(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = _two_tower()
    encoder = TwoTowerUserEncoder(model).eval()
    path = tmp_path / "model.onnx"
    write_onnx(encoder, encoder.random_inputs(2, 4, torch.Generator().manual_seed(0)), path)
    report = parity(encoder, path, encoder.item_vectors(), tolerance=1e-4)
    assert report["max_abs_diff"] <= 1e-5 and all(c["same_top10"] for c in report["cases"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert (
        [i.name for i in session.get_inputs()]
        == encoder.names
        == ["item_ids", "user_idx", "user_country", "user_tags", "user_dense"]
    )
    inputs = _encoder_inputs(_users())  # widths 6, 1 and 3: none of them the example's
    got = session.run(["user_vector"], {n: x.numpy() for n, x in zip(encoder.names, inputs)})[0]
    with torch.no_grad():
        assert np.allclose(got, encoder(*inputs).numpy(), atol=1e-5)
    with pytest.raises(ExportError, match="parity failed"):
        parity(encoder, path, encoder.item_vectors(), tolerance=0.0)


def test_two_tower_without_user_inputs_exports(tmp_path: Path) -> None:
    # The ML-1M shape: history only (no user id, no user features).
    torch.manual_seed(0)
    model = TwoTower(
        TwoTowerConfig(
            num_items=N,
            dim=16,
            out_dim=8,
            history_len=H,
            pooling="exp_decay",
            item_tower=TowerConfig([], 0.0),
            user_tower=TowerConfig([16], 0.0),
        )
    ).eval()
    encoder = TwoTowerUserEncoder(model).eval()
    assert encoder.names == ["item_ids"]
    write_onnx(
        encoder, encoder.random_inputs(2, 4, torch.Generator().manual_seed(0)), tmp_path / "m.onnx"
    )
    assert (
        parity(encoder, tmp_path / "m.onnx", encoder.item_vectors(), tolerance=1e-4)["max_abs_diff"]
        <= 1e-5
    )


def _sasrec(block: str = "pre_ln", attributes: bool = False) -> SASRec:
    torch.manual_seed(0)
    config = SASRecConfig(
        num_items=N,
        max_len=8,
        dim=16,
        num_layers=1,
        num_heads=2,
        dropout=0.0,
        attention_dropout=0.0,
        block=block,  # type: ignore[arg-type]
        item_feature_cardinalities={"tags": 6} if attributes else {},
    )
    model = SASRec(config).eval()
    if attributes:  # item i has tags {i % 6, (i + 1) % 6} (item 0, padding: none)
        codes = np.array([[i % 6, (i + 1) % 6] for i in range(1, N + 1)]).reshape(-1)
        model.set_item_features({"tags": (np.r_[0, np.arange(0, 2 * N + 1, 2)], codes)})
    return model


@pytest.mark.parametrize(
    "block, attributes", [("pre_ln", False), ("ligr", False), ("pre_ln", True)]
)
def test_sasrec_encoder_scores_like_the_model(block: str, attributes: bool) -> None:
    # The evaluation path (score_all: TorchRec lookup, tied output) ranks as encoder . item vectors;
    # with item attributes the encoder's baked rows must equal table + attributes on both sides.
    model = _sasrec(block, attributes)
    encoder = SASRecUserEncoder(model).eval()
    ids = torch.tensor([[1, 2, 3, 0, 0], [5, 0, 0, 0, 0], [4, 4, 9, 12, 30]])
    with torch.no_grad():
        expected = model.score_all(ids, (ids != 0).sum(1))[:, 1:]  # (B, N), padding column dropped
        got = encoder(ids).numpy() @ encoder.item_vectors().T
    assert np.allclose(got, expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("block, attributes", [("ligr", False), ("pre_ln", True)])
def test_sasrec_exports_with_parity(tmp_path: Path, block: str, attributes: bool) -> None:
    # The gated block adds sigmoid gates and a SwiGLU FFN to the graph; attributes are baked into
    # the encoder's item rows. onnxruntime must agree.
    encoder = SASRecUserEncoder(_sasrec(block, attributes)).eval()
    inputs = (torch.tensor([[1, 2, 3, 0, 0], [5, 0, 0, 0, 0], [4, 4, 9, 12, 30]]),)
    write_onnx(encoder, inputs, tmp_path / "m.onnx")
    report = parity(encoder, tmp_path / "m.onnx", encoder.item_vectors(), tolerance=1e-4)
    assert report["max_abs_diff"] <= 1e-5
