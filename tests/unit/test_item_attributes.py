"""recforge.models.item_attributes and SASRec's item_feature_cardinalities: mean-pooled codes, the
sum read everywhere an item row is, one table lookup per step, and an item never trained on
that is still ranked by what its attribute learned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recforge.models.item_attributes import ItemAttributes
from recforge.models.sasrec import EC_MODULE, SASRec, SASRecConfig

N = 30
LOSSES = ("ce", "sampled_softmax", "bce", "gbce")


def _ragged(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets, codes)`` of per-row code lists (row 0 first)."""
    lengths = [len(r) for r in rows]
    return np.r_[0, np.cumsum(lengths)], np.array([c for r in rows for c in r], dtype=np.int64)


def _classes(num_classes: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Item i has the one code i % num_classes; padding row 0 has none."""
    return {"cls": _ragged([[]] + [[i % num_classes] for i in range(1, N + 1)])}


def _model(loss: str = "ce", attributes: int = 3, **overrides) -> SASRec:
    torch.manual_seed(0)
    config = SASRecConfig(
        **{
            "num_items": N,
            "max_len": 8,
            "dim": 16,
            "num_layers": 1,
            "num_heads": 1,
            "dropout": 0.0,
            "loss": loss,
            "num_negatives": 7,
            "item_feature_cardinalities": {"cls": attributes} if attributes else {},
            **overrides,
        }
    )
    model = SASRec(config)
    if attributes:
        model.set_item_features(_classes(attributes))
    return model


def test_codes_are_mean_pooled_and_an_item_without_codes_adds_zero() -> None:
    attributes = ItemAttributes({"tags": 5, "brand": 2}, num_items=3, dim=4)
    attributes.set_codes(
        {"tags": _ragged([[], [0, 1, 4], [], [4]]), "brand": _ragged([[], [1], [0], []])}
    )
    tags, brand = (
        attributes.embedding_bags["item_tags"].weight,
        attributes.embedding_bags["item_brand"].weight,
    )
    with torch.no_grad():
        out = attributes(torch.tensor([0, 1, 2, 3, 1]))
    torch.testing.assert_close(out[1], (tags[0] + tags[1] + tags[4]) / 3 + brand[1])
    torch.testing.assert_close(out[2], brand[0])
    torch.testing.assert_close(out[3], tags[4])
    assert out[0].abs().sum() == 0  # padding: no code in any feature
    torch.testing.assert_close(out[4], out[1])


@pytest.mark.parametrize(
    "sparse, message",
    [
        ({}, r"no codes for item feature\(s\) \['tags'\]"),
        ({"tags": _ragged([[], [5], [], []])}, r"'tags': codes must lie in \[0, 5\)"),
        ({"tags": _ragged([[], [1], []])}, r"'tags': offsets must be \(5,\)"),
    ],
)
def test_bad_codes_name_the_feature(sparse: dict, message: str) -> None:
    attributes = ItemAttributes({"tags": 5}, num_items=3, dim=4)
    with pytest.raises(ValueError, match=message):
        attributes.set_codes(sparse)


def test_reading_rows_before_the_codes_are_set_is_an_error() -> None:
    # A table-only row would pass every parity check silently; it must not be served.
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=N, dim=16, item_feature_cardinalities={"cls": 3}))
    with pytest.raises(RuntimeError, match="no codes set; call SASRec.set_item_features"):
        model.score_all(torch.tensor([[1, 2]]), torch.tensor([2]))
    with pytest.raises(RuntimeError, match="no codes set"):
        model.item_rows()


def test_config_rejects_bad_cardinalities_and_codes_for_a_model_without_attributes() -> None:
    with pytest.raises(ValueError, match="SASRecConfig.item_feature_cardinalities"):
        SASRecConfig(num_items=10, item_feature_cardinalities={"a b": 3})
    with pytest.raises(ValueError, match="SASRecConfig.item_feature_cardinalities"):
        SASRecConfig(num_items=10, item_feature_cardinalities={"tags": 0})
    with pytest.raises(ValueError, match="no item_feature_cardinalities"):
        _model(attributes=0).set_item_features(_classes(3))


def test_scores_use_table_plus_attributes_on_both_sides() -> None:
    model = _model().eval()
    rows = model.item_rows()  # (N + 1, D)
    attributes = model.item_attributes
    assert attributes is not None
    with torch.no_grad():
        expected_rows = model.item_table.weight + attributes(torch.arange(N + 1))
    torch.testing.assert_close(rows, expected_rows)
    ids, lengths = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]]), torch.tensor([3, 4])
    with torch.no_grad():
        hidden = model.encode(rows[ids] * (ids != 0)[..., None], lengths)
        expected = model.user_vector(hidden, lengths) @ rows[1:].T
        scores = model.score_all(ids, lengths)[:, 1:]
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", LOSSES)
def test_one_lookup_per_step_and_gradients_reach_the_attributes(loss: str) -> None:
    model = _model(loss).train()
    calls = [0]
    model.embedding_collection.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    inputs = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    targets = torch.tensor([[2, 3, 4, 0], [5, 6, 7, 8]])
    value, _ = model.training_loss(inputs, targets, torch.tensor([3, 4]), torch.ones(2))
    value.backward()
    assert calls[0] == 1
    grad = model.item_attributes.embedding_bags["item_cls"].weight.grad  # type: ignore[union-attr]
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad[:3].abs().sum(-1) > 0).all()  # every class is among the batch's items
    table = dict(model.named_parameters())[f"{EC_MODULE}.embeddings.item_table.weight"].grad
    assert table is not None and (table[1:9].abs().sum(-1) > 0).all()


def _class_batch(g: torch.Generator, batch: int, length: int, unseen: int) -> tuple:
    """Sequences whose next item is a random item of the next class ((i % 3) + 1 mod 3), never
    the item ``unseen``: (inputs, targets, lengths)."""
    by_class = [[i for i in range(1, N + 1) if i % 3 == c and i != unseen] for c in range(3)]
    seq = torch.zeros(batch, length + 1, dtype=torch.long)
    cls = torch.randint(0, 3, (batch,), generator=g)
    for t in range(length + 1):
        for b in range(batch):
            pool = by_class[int(cls[b])]
            seq[b, t] = pool[int(torch.randint(len(pool), (1,), generator=g))]
        cls = (cls + 1) % 3
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length) < lengths[:, None]
    return seq[:, :length] * mask, seq[:, 1:] * mask, lengths


def _beats_wrong_class(attributes: int) -> float:
    """After training with or without the class attribute: for histories whose next class is
    the class of an item never in training, the share of them in which that item outscores every
    item of the two wrong classes."""
    unseen = 30  # class 0, the right class after a class-2 item
    model = _model(attributes=attributes, dim=32, dropout=0.1).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        inputs, targets, lengths = _class_batch(g, 32, 8, unseen)
        value, _ = model.training_loss(inputs, targets, lengths, torch.ones(32))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    model.eval()
    inputs, _, lengths = _class_batch(g, 512, 8, unseen)
    last = inputs[torch.arange(512), lengths - 1]
    keep = last % 3 == 2
    with torch.no_grad():
        scores = model.score_all(inputs[keep], lengths[keep])
    wrong = torch.tensor([i for i in range(1, N + 1) if i % 3 != 0])
    return (scores[:, unseen] > scores[:, wrong].max(-1).values).float().mean().item()


def test_an_item_never_trained_on_is_ranked_through_its_attribute() -> None:
    # Full cross-entropy pushes the unseen item's own row down (it is only ever a negative); its
    # attribute, trained by its 9 classmates, still lifts it above the 20 wrong-class items; by id
    # alone it does so about as often as not (about half the time here).
    with_attribute, ids_only = _beats_wrong_class(3), _beats_wrong_class(0)
    assert with_attribute > 0.9, with_attribute
    assert ids_only < 0.75, ids_only


def test_the_evaluations_user_and_item_vectors_carry_the_attributes() -> None:
    # Chunked and item-sharded evaluation score eval_user_vectors . eval_item_vectors; both sides
    # must read table + attributes, as score_all does.
    from types import SimpleNamespace

    from recforge.trainer.sasrec_module import SASRecModule

    model = _model().eval()
    module = SASRecModule(model.config)
    module.net = SimpleNamespace(module=model)  # what configure_model's sharding leaves
    ids, lengths = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]]), torch.tensor([3, 4])
    with torch.no_grad():
        users = module.eval_user_vectors({"input_ids": ids, "lengths": lengths})
        items = module.eval_item_vectors(torch.arange(1, N + 1))
        expected = model.score_all(ids, lengths)[:, 1:]
    torch.testing.assert_close(items, model.item_rows()[1:])
    torch.testing.assert_close(users @ items.T, expected, atol=1e-5, rtol=1e-5)
