"""recforge.models.dropout: the cheaper CPU dropout mask keeps F.dropout's contract."""

from __future__ import annotations

import math

import pytest
import torch

from recforge.models.dropout import Dropout, dropout, dropout_mask, effective_p


@pytest.mark.parametrize("p", [0.2, 0.1, 0.5, 0.9])
def test_mask_drops_the_rounded_fraction_and_keeps_the_expectation(p: float) -> None:
    torch.manual_seed(0)
    n = 1 << 20
    mask = dropout_mask((n // 64, 64), p, torch.float32)
    q = effective_p(p)
    assert abs(q - p) <= 1 / 512
    dropped = (mask == 0).float().mean().item()
    assert abs(dropped - q) < 5 * math.sqrt(q * (1 - q) / n)  # 5 sigma of a binomial
    values = mask.unique().tolist()
    assert values == [0.0, pytest.approx(1 / (1 - q))]
    assert mask.mean().item() == pytest.approx(1.0, abs=5 * math.sqrt(q / (1 - q) / n))


def test_every_byte_of_the_random_words_is_uniform() -> None:
    # The mask reads each 64-bit random word as 8 bytes: a generator whose words were not
    # uniform over all 64 bits (say non-negative only) would bias every 8th element.
    torch.manual_seed(1)
    mask = dropout_mask((1 << 20,), 0.5, torch.float32).view(-1, 8)
    per_byte = (mask == 0).float().mean(0)
    assert torch.all((per_byte - 0.5).abs() < 5 * math.sqrt(0.25 / mask.shape[0])), per_byte


def test_the_seed_fixes_the_mask_and_the_gradient_is_the_mask() -> None:
    x = torch.randn(3, 50, 7, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, 0.3, True)
    torch.manual_seed(3)
    again = dropout(x, 0.3, True)
    assert torch.equal(y, again)
    scale = 1 / (1 - effective_p(0.3))
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] * scale)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(grad, kept.float() * scale)


def test_eval_mode_tiny_p_and_bad_p() -> None:
    x = torch.randn(4, 10)
    module = Dropout(0.2).eval()
    assert module(x) is x
    assert dropout(x, 0.0, True) is x
    # Below 1/512 the 8-bit mask would round p to 0: F.dropout keeps it exact.
    assert effective_p(0.001) == 0.0
    torch.manual_seed(0)
    big = torch.ones(1 << 16)
    assert 0 < (dropout(big, 0.001, True) == 0).sum() < 200
    with pytest.raises(ValueError, match="p=1.0"):
        Dropout(1.0)
    with pytest.raises(ValueError, match="p=-0.1"):
        dropout_mask((3,), -0.1, torch.float32)
