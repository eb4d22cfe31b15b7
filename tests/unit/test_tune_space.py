"""The search-space file of `recforge tune`: good entries parse, bad ones name their key."""

from __future__ import annotations

from pathlib import Path

import pytest

from recforge.trainer.tuning.space import SpaceError, load_space, set_dotted

REPO = Path(__file__).resolve().parents[2]


def test_shipped_space_parses() -> None:
    params = {p.key: p for p in load_space(REPO / "configs" / "tune" / "sasrec_tiny_space.yaml")}
    lr = params["model.init_args.optimizer.lr"]
    assert (lr.kind, lr.log, lr.low, lr.high) == ("float", True, 1e-5, 1e-2)
    assert params["model.init_args.model.num_layers"].kind == "int"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{type: float, low: 0.1}", "missing high"),
        ("{type: float, low: 0.1, high: 0.01}", "low (0.1) is above high (0.01)"),
        ("{type: float, low: 0, high: 1, log: true}", "log: true needs low > 0"),
        ("{type: int, low: 1, high: 2.5}", "high must be an integer"),
        ("{type: categorical, choices: []}", "choices must be a non-empty list"),
        ("{type: uniform, low: 0, high: 1}", "type 'uniform'"),
        ("{type: float, low: 0, high: 1, lg: true}", "unknown field(s) lg"),
        ("0.1", "expected a mapping"),
    ],
)
def test_bad_entry_is_one_error_naming_the_key(tmp_path: Path, entry: str, message: str) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(f"model.init_args.optimizer.lr: {entry}\n")
    with pytest.raises(SpaceError) as raised:
        load_space(path)
    assert "model.init_args.optimizer.lr" in str(raised.value)
    assert message in str(raised.value)


def test_set_dotted_makes_the_mappings_on_the_way() -> None:
    config = {"model": {"class_path": "x", "init_args": {"dim": 8}}}
    set_dotted(config, "model.init_args.optimizer.lr", 0.01)
    assert config == {
        "model": {"class_path": "x", "init_args": {"dim": 8, "optimizer": {"lr": 0.01}}}
    }
