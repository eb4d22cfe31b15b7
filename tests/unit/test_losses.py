"""recforge.models.losses: hand-computed values, logQ, accidental hits, weights, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from recforge.models.losses import (
    bce_one_negative,
    full_softmax_ce,
    gbce,
    sampled_softmax,
    sampled_softmax_logits,
    weighted_mean,
)


def _lse(xs: list[float]) -> float:
    finite = [x for x in xs if x != float("-inf")]
    top = max(finite)
    return top + math.log(sum(math.exp(x - top) for x in finite))


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


Q = [[1.0, 0.0], [0.5, -1.0]]
CATALOG = [[1.0, 2.0], [0.0, 1.0], [-1.0, 0.5]]


def test_full_softmax_ce_hand_computed() -> None:
    target, weight, tau = [2, 0], [1.0, 3.0], 0.5
    expected_rows = []
    for q, y in zip(Q, target):
        logits = [_dot(q, e) / tau for e in CATALOG]
        expected_rows.append(_lse(logits) - logits[y])
    expected = sum(w * loss for w, loss in zip(weight, expected_rows)) / sum(weight)
    got = full_softmax_ce(
        torch.tensor(Q),
        torch.tensor(CATALOG),
        torch.tensor(target),
        torch.tensor(weight),
        temperature=tau,
    )
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_sampled_softmax_hand_computed_with_logq_and_hits() -> None:
    # Two positions with targets 7 and 9; uniform negatives 9 and 4. Row 0's candidates:
    # positive 7, in-batch 7 (itself: masked), 9, uniform 9, 4. Row 1 (target 9): positive 9,
    # in-batch 7, 9 (itself: masked), uniform 9 (accidental hit: masked), 4.
    tgt_emb = [[0.3, 0.1], [1.0, -0.5]]
    neg_emb = [[1.0, -0.5], [0.2, 0.4]]  # negative 9 shares item 9's embedding
    log_q_t, log_q_n = [-1.0, -2.0], [-2.0, -0.5]
    tau = 2.0
    rows = []
    for t, q in enumerate(Q):
        pos = _dot(q, tgt_emb[t]) / tau - log_q_t[t]
        cands = [pos]
        for j in range(2):
            cands.append(float("-inf") if j == t else _dot(q, tgt_emb[j]) / tau - log_q_t[j])
        for k, nid in enumerate([9, 4]):
            hit = nid == [7, 9][t]
            cands.append(float("-inf") if hit else _dot(q, neg_emb[k]) / tau - log_q_n[k])
        rows.append(_lse(cands) - pos)
    got = sampled_softmax(
        torch.tensor(Q),
        torch.tensor(tgt_emb),
        torch.tensor([7, 9]),
        torch.tensor(neg_emb),
        torch.tensor([9, 4]),
        in_batch=True,
        log_q_target=torch.tensor(log_q_t),
        log_q_negative=torch.tensor(log_q_n),
        temperature=tau,
        weight=torch.ones(2),
    )
    assert got.item() == pytest.approx(sum(rows) / 2, rel=1e-6)


def _random_case(seed: int = 0, t: int = 6, m: int = 5, d: int = 4, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(t, d, generator=g)
    target_emb = torch.randn(t, d, generator=g)
    negatives_emb = torch.randn(m, d, generator=g)
    target_ids = torch.randint(1, n + 1, (t,), generator=g)
    negative_ids = torch.randint(1, n + 1, (m,), generator=g)
    log_q_t = torch.randn(t, generator=g)
    log_q_n = torch.randn(m, generator=g)
    return query, target_emb, target_ids, negatives_emb, negative_ids, log_q_t, log_q_n


def test_logq_shifts_each_candidate_logit_by_exactly_minus_log_q() -> None:
    query, target_emb, target_ids, neg_emb, neg_ids, log_q_t, log_q_n = _random_case()
    off = sampled_softmax_logits(query, target_emb, target_ids, neg_emb, neg_ids, in_batch=True)
    on = sampled_softmax_logits(
        query,
        target_emb,
        target_ids,
        neg_emb,
        neg_ids,
        in_batch=True,
        log_q_target=log_q_t,
        log_q_negative=log_q_n,
    )
    t = len(target_ids)
    expected_shift = -torch.cat(
        [log_q_t[:, None], log_q_t[None, :].expand(t, -1), log_q_n[None, :].expand(t, -1)], dim=1
    )
    finite = torch.isfinite(off)
    assert torch.equal(finite, torch.isfinite(on))  # the correction never unmasks or masks
    torch.testing.assert_close((on - off)[finite], expected_shift[finite], rtol=0, atol=1e-6)


def test_accidental_hits_are_masked_and_equal_dropping_them() -> None:
    query, target_emb, _, neg_emb, _, _, _ = _random_case(1, t=4, m=3)
    target_ids = torch.tensor([5, 6, 5, 7])
    negative_ids = torch.tensor([6, 1, 5])
    logits = sampled_softmax_logits(
        query, target_emb, target_ids, neg_emb, negative_ids, in_batch=True
    )
    assert logits.shape == (4, 1 + 4 + 3)
    assert torch.isfinite(logits[:, 0]).all()
    expected_masked = torch.cat(
        [target_ids[:, None] == target_ids[None, :], target_ids[:, None] == negative_ids[None, :]],
        dim=1,
    )
    assert torch.equal(torch.isinf(logits[:, 1:]), expected_masked)
    # Row 0 (target 5): the loss is the softmax over the positive and the surviving candidates.
    keep = [target_emb[1], target_emb[3], neg_emb[0], neg_emb[1]]
    row0 = torch.stack([query[0] @ target_emb[0]] + [query[0] @ e for e in keep])
    expected = torch.logsumexp(row0, 0) - row0[0]
    loss = sampled_softmax(
        query,
        target_emb,
        target_ids,
        neg_emb,
        negative_ids,
        in_batch=True,
        log_q_target=None,
        log_q_negative=None,
        weight=torch.tensor([1.0, 0, 0, 0]),
    )
    torch.testing.assert_close(loss, expected)


def test_in_batch_only_and_uniform_only() -> None:
    query, target_emb, target_ids, neg_emb, neg_ids, log_q_t, log_q_n = _random_case(2)
    only_in = sampled_softmax_logits(
        query, target_emb, target_ids, None, None, in_batch=True, log_q_target=log_q_t
    )
    assert only_in.shape == (6, 7)
    only_uniform = sampled_softmax_logits(
        query,
        target_emb,
        target_ids,
        neg_emb,
        neg_ids,
        in_batch=False,
        log_q_target=log_q_t,
        log_q_negative=log_q_n,
    )
    assert only_uniform.shape == (6, 6)
    with pytest.raises(ValueError, match="no negatives"):
        sampled_softmax_logits(query, target_emb, target_ids, None, None, in_batch=False)
    with pytest.raises(ValueError, match="log_q_negative"):
        sampled_softmax_logits(
            query, target_emb, target_ids, neg_emb, neg_ids, in_batch=True, log_q_target=log_q_t
        )


def test_bce_one_negative_hand_computed() -> None:
    pos, neg, weight = [[1.0, 1.0], [0.0, 2.0]], [[-1.0, 0.5], [1.0, 1.0]], [2.0, 1.0]
    rows = []
    for q, p, n in zip(Q, pos, neg):
        sp, sn = _dot(q, p), _dot(q, n)
        rows.append(-math.log(1 / (1 + math.exp(-sp))) - math.log(1 - 1 / (1 + math.exp(-sn))))
    expected = (2 * rows[0] + rows[1]) / 3
    got = bce_one_negative(
        torch.tensor(Q), torch.tensor(pos), torch.tensor(neg), torch.tensor(weight)
    )
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("calibration", [0.0, 0.75, 1.0])
def test_gbce_hand_computed(calibration: float) -> None:
    pos, weight = [[1.0, 1.0], [0.0, 2.0]], [2.0, 1.0]
    negs, neg_ids, target_ids, n = [[-1.0, 0.5], [1.0, 1.0], [0.3, 0.2]], [7, 3, 9], [3, 4], 21
    k = len(negs)
    alpha = k / (n - 1)
    beta = alpha * (calibration * (1 - 1 / alpha) + 1 / alpha)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    rows = []
    for q, p, y in zip(Q, pos, target_ids):
        term = -beta * math.log(sigmoid(_dot(q, p)))
        # Negative 3 is row 0's target: an accidental hit, left out of that row's sum.
        term -= sum(math.log(1 - sigmoid(_dot(q, e))) for e, i in zip(negs, neg_ids) if i != y)
        rows.append(term / (1 + k))
    got = gbce(
        torch.tensor(Q),
        torch.tensor(pos),
        torch.tensor(target_ids),
        torch.tensor(negs),
        torch.tensor(neg_ids),
        num_items=n,
        calibration=calibration,
        weight=torch.tensor(weight),
    )
    assert got.item() == pytest.approx((2 * rows[0] + rows[1]) / 3, rel=1e-6)
    if calibration == 0.0:  # t = 0 is plain BCE over the positive and the K negatives
        assert beta == pytest.approx(1.0)


def _all_losses(query, target_emb, target_ids, neg_emb, neg_ids, weight):
    """Each loss on the same inputs (sampled softmax without in-batch: rows stay independent)."""
    catalog = torch.cat([target_emb, neg_emb])
    return {
        "ce": full_softmax_ce(query, catalog, torch.arange(len(query)), weight),
        "sampled": sampled_softmax(
            query,
            target_emb,
            target_ids,
            neg_emb,
            neg_ids,
            in_batch=False,
            log_q_target=None,
            log_q_negative=None,
            weight=weight,
        ),
        "bce": bce_one_negative(query, target_emb, neg_emb[: len(query)], weight),
        "gbce": gbce(
            query,
            target_emb,
            target_ids,
            neg_emb,
            neg_ids,
            num_items=50,
            calibration=0.75,
            weight=weight,
        ),
    }


def test_weight_zero_rows_contribute_nothing() -> None:
    query, target_emb, target_ids, neg_emb, neg_ids, _, _ = _random_case(3, t=5, m=5)
    weight = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0])
    garbage = query.clone()
    garbage[[1, 4]] = 1e3 * torch.randn(2, query.shape[1])
    base = _all_losses(query, target_emb, target_ids, neg_emb, neg_ids, weight)
    changed = _all_losses(garbage, target_emb, target_ids, neg_emb, neg_ids, weight)
    for name in base:
        torch.testing.assert_close(base[name], changed[name], msg=name)
    # The weight-0 rows' queries get no gradient.
    q = query.clone().requires_grad_(True)
    for name, loss in _all_losses(q, target_emb, target_ids, neg_emb, neg_ids, weight).items():
        (grad,) = torch.autograd.grad(loss, q)
        assert grad[[1, 4]].abs().max() == 0, name
        assert grad[[0, 2, 3]].abs().max() > 0, name
    # All weights 0 (a filler batch): 0, with finite zero gradients.
    q = query.clone().requires_grad_(True)
    for name, loss in _all_losses(
        q, target_emb, target_ids, neg_emb, neg_ids, torch.zeros(5)
    ).items():
        assert loss.item() == 0.0, name
        (grad,) = torch.autograd.grad(loss, q)
        assert torch.equal(grad, torch.zeros_like(grad)), name


def test_gradients_reach_query_and_item_embeddings() -> None:
    query, target_emb, target_ids, neg_emb, neg_ids, log_q_t, log_q_n = _random_case(4)
    leaves = [t.clone().requires_grad_(True) for t in (query, target_emb, neg_emb)]
    q, te, ne = leaves
    loss = sampled_softmax(
        q,
        te,
        target_ids,
        ne,
        neg_ids,
        in_batch=True,
        log_q_target=log_q_t,
        log_q_negative=log_q_n,
        temperature=0.5,
        weight=torch.ones(6),
    )
    loss = loss + full_softmax_ce(q, ne, torch.zeros(6, dtype=torch.long), torch.ones(6))
    loss = loss + bce_one_negative(q, te, ne[:1].expand(6, -1), torch.ones(6))
    loss.backward()
    for leaf in leaves:
        assert (
            leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0
        )


def test_weighted_mean_shape_check() -> None:
    with pytest.raises(ValueError, match="weight"):
        weighted_mean(torch.ones(3), torch.ones(2))


def _unfused_ce(query, catalog, target, weight, tau):
    per_position = torch.nn.functional.cross_entropy(
        (query @ catalog.T / tau).float(), target, reduction="none"
    )
    return (per_position * weight).sum() / weight.sum()


@pytest.mark.parametrize("chunk_logits", [1, 40, 1 << 20])
def test_chunked_ce_matches_full_logits_value_and_gradients(monkeypatch, chunk_logits: int) -> None:
    # 1 logit per chunk still means one row per chunk; 40 splits 23 rows of 11 items unevenly.
    monkeypatch.setattr("recforge.models.losses._CHUNK_LOGITS", chunk_logits)
    g = torch.Generator().manual_seed(0)
    query = (3 * torch.randn(23, 5, generator=g)).requires_grad_(True)
    catalog = torch.randn(11, 5, generator=g).requires_grad_(True)
    target = torch.randint(0, 11, (23,), generator=g)
    weight = torch.rand(23, generator=g)
    weight[4] = 0.0
    got = full_softmax_ce(query, catalog, target, weight, temperature=0.7)
    want = _unfused_ce(query, catalog, target, weight, 0.7)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for a, b in zip(
        torch.autograd.grad(3 * got, (query, catalog)),
        torch.autograd.grad(3 * want, (query, catalog)),
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert full_softmax_ce(
            query, catalog, target, weight, temperature=0.7
        ).item() == pytest.approx(got.item())


def test_chunked_ce_gradcheck_in_double(monkeypatch) -> None:
    monkeypatch.setattr("recforge.models.losses._CHUNK_LOGITS", 8)
    g = torch.Generator().manual_seed(1)
    query = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    catalog = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    target, weight = torch.randint(0, 4, (7,), generator=g), torch.rand(7, generator=g)
    assert torch.autograd.gradcheck(
        lambda q, c: full_softmax_ce(q, c, target, weight, temperature=0.5), (query, catalog)
    )


def test_chunked_ce_bf16_inputs_get_bf16_gradients_of_a_float32_softmax() -> None:
    g = torch.Generator().manual_seed(2)
    query = torch.randn(6, 4, generator=g).bfloat16().requires_grad_(True)
    catalog = torch.randn(9, 4, generator=g).bfloat16().requires_grad_(True)
    target, weight = torch.randint(0, 9, (6,), generator=g), torch.ones(6)
    loss = full_softmax_ce(query, catalog, target, weight)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(
        _unfused_ce(query.float(), catalog.float(), target, weight, 1.0).item(), rel=1e-5
    )
    loss.backward()
    assert query.grad.dtype == catalog.grad.dtype == torch.bfloat16


def test_full_softmax_ce_names_bad_inputs() -> None:
    q, c = torch.randn(3, 2), torch.randn(4, 2)
    with pytest.raises(ValueError, match="target_index: values must be in"):
        full_softmax_ce(q, c, torch.tensor([0, 4, 1]), torch.ones(3))
    with pytest.raises(ValueError, match="catalog: 3 columns"):
        full_softmax_ce(q, torch.randn(4, 3), torch.tensor([0, 1, 1]), torch.ones(3))
    with pytest.raises(ValueError, match="weight"):
        full_softmax_ce(q, c, torch.tensor([0, 1, 1]), torch.ones(2))


def test_chunked_ce_is_exact_where_the_target_probability_underflows() -> None:
    # Row 0's target sits 2000 below the best item: its softmax probability is 0 in float32,
    # and the loss must come from the logits (2000), not from -log(0) = inf.
    query = torch.tensor([[100.0, 0.0], [0.1, 0.2]], requires_grad=True)
    catalog = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 1.0]], requires_grad=True)
    target, weight = torch.tensor([1, 2]), torch.tensor([1.0, 2.0])
    got = full_softmax_ce(query, catalog, target, weight)
    want = _unfused_ce(query, catalog, target, weight, 1.0)
    assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-6)
    for a, b in zip(
        torch.autograd.grad(got, (query, catalog)), torch.autograd.grad(want, (query, catalog))
    ):
        torch.testing.assert_close(a, b)
