"""`recforge tune`'s inputs: the search-space file (good entries parse, bad ones name their key)
and the base config (read as fit reads it; the trial `--enqueue-base` runs)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from recforge.trainer.tuning.base_config import base_values, preset_values, read_base_config
from recforge.trainer.tuning.optuna_setup import make_sampler
from recforge.trainer.tuning.space import (
    SpaceError,
    dotted_pairs,
    dump_yaml,
    load_space,
    load_yaml,
    parse_param,
    set_dotted,
)
from recforge.trainer.tuning.study import main as tune_main

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


def test_base_values_are_the_config_after_its_overrides() -> None:
    space = load_space(REPO / "configs" / "tune" / "sasrec_tiny_space.yaml")
    base = {"model": {"init_args": {"model": {"dropout": 0.1, "num_layers": 2}}}}
    overrides = dotted_pairs(["--model.init_args.model.dropout", "0.3", "--trainer.max_epochs=2"])
    values = base_values(space, base, overrides, "base.yaml")
    # Only what the config and its overrides set; base_trial_values adds the class defaults.
    assert values == {"model.init_args.model.dropout": 0.3, "model.init_args.model.num_layers": 2}
    assert base["model"]["init_args"]["model"]["dropout"] == 0.1, "the base is not changed"


@pytest.mark.parametrize(
    ("spec", "value", "problem"),
    [
        ({"type": "float", "low": 0.0, "high": 0.4}, 0.5, "outside [0.0, 0.4]"),
        ({"type": "int", "low": 1, "high": 3}, 1.5, "not an integer"),
        ({"type": "float", "low": 0.0, "high": 0.4}, "high", "not a number"),
        ({"type": "categorical", "choices": ["ce", "bce"]}, "gbce", "not one of ['ce', 'bce']"),
        ({"type": "float", "low": 0.3, "high": 0.7, "step": 0.1}, 0.35, "not on the grid"),
        ({"type": "int", "low": 16, "high": 64, "step": 16}, 40, "not on the grid"),
    ],
)
def test_a_base_value_the_space_cannot_reach_is_refused(
    spec: dict, value: object, problem: str
) -> None:
    param = parse_param("model.init_args.model.x", spec)
    base = {"model": {"init_args": {"model": {"x": value}}}}
    with pytest.raises(SpaceError) as raised:
        base_values([param], base, [], "base.yaml")
    message = str(raised.value)
    assert "--enqueue-base: model.init_args.model.x" in message and "base.yaml" in message
    assert problem in message


def test_base_values_read_numbers_as_fit_does(tmp_path: Path) -> None:
    # PyYAML reads 1e-3 (no dot) as a string; `recforge fit` (jsonargparse) as a number, and so
    # do the base config, the overrides and the space file here.
    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        "model.init_args.optimizer.lr: {type: categorical, choices: [1e-3, 1e-2]}\n"
        "model.init_args.embedding_optimizer.lr: {type: float, low: 1e-3, high: 1e-1, log: true}\n"
    )
    space = load_space(space_file)
    assert space[0].choices == (1e-3, 1e-2) and space[1].low == 1e-3
    config = tmp_path / "base.yaml"
    config.write_text("model: {init_args: {optimizer: {lr: 1e-3}}}\n")
    overrides = dotted_pairs(["--model.init_args.embedding_optimizer.lr", "5e-2"])
    values = base_values(space, read_base_config(str(config)), overrides, "base.yaml")
    assert values == {
        "model.init_args.optimizer.lr": 1e-3,
        "model.init_args.embedding_optimizer.lr": 5e-2,
    }
    on_grid = parse_param("k", {"type": "float", "low": 0.0, "high": 0.4, "step": 0.1})
    assert on_grid.rejects(0.3) is None  # 0.3 is 3 steps up to rounding


def test_a_base_that_sets_no_searched_key_is_refused() -> None:
    space = load_space(REPO / "configs" / "tune" / "sasrec_tiny_space.yaml")
    with pytest.raises(SpaceError, match="no searched key has a value"):
        base_values(space, {"trainer": {"max_epochs": 3}}, [], "base.yaml")


def test_yaml_is_read_and_written_as_fit_reads_it(tmp_path: Path) -> None:
    config = tmp_path / "base.yaml"
    config.write_text('a: 1e-3\nb: -2.5E4\nc: 0.5\nd: e5\ne: "1e-3"\nf: 2024-01-01\ng: off\n')
    read = read_base_config(str(config))
    assert read == {
        "a": 1e-3,
        "b": -2.5e4,
        "c": 0.5,
        "d": "e5",
        "e": "1e-3",
        "f": "2024-01-01",
        "g": False,
    }
    # best_config.yaml is written this way: the string the user quoted stays a string for fit,
    # although to PyYAML's YAML 1.1 rules it needs no quotes.
    written = dump_yaml(read)
    assert "e: '1e-3'" in written and "a: 0.001" in written
    assert load_yaml(written) == read


def test_base_values_take_the_preset_below_the_yaml_and_the_overrides(tmp_path: Path) -> None:
    # As in fit: what the preset derives from the data, then the YAML, then the command line.
    from recforge.data.datamodule import ensure_synthetic
    from recforge.trainer.presets import DROPOUT, TABLE_DECAY, TABLE_LR, TABLE_OPTIMIZER

    data = tmp_path / "data"
    ensure_synthetic(str(data), {"users": 200, "items": 150, "mean_length": 8, "seed": 0})
    space = load_space(REPO / "configs" / "tune" / "sasrec_auto_space.yaml")
    base = read_base_config(str(REPO / "configs" / "sasrec" / "auto.yaml"))
    base["model"]["init_args"]["model"]["dropout"] = 0.3
    overrides = dotted_pairs(
        ["--data.data_dir", str(data), f"--{TABLE_DECAY}", "0.002", "--foo", "1"]
    )
    derived = preset_values(base, overrides, "auto.yaml")
    assert derived[DROPOUT] == 0.5 and derived[TABLE_LR] == 0.13  # a sparse synthetic set
    values = base_values(space, base, overrides, "auto.yaml", derived)
    assert values == {
        DROPOUT: 0.3,  # the YAML wins over the preset's 0.5
        "model.init_args.optimizer.lr": base["model"]["init_args"]["optimizer"]["lr"],  # YAML
        TABLE_LR: 0.13,  # the preset's
        TABLE_DECAY: 0.002,  # the override wins over the preset's 0.001
    }
    assert preset_values({"model": {}}, overrides, "x.yaml") == {}  # no preset: nothing derived
    # With sgd the table's rate and decay are not derived, as in fit.
    sgd = preset_values(base, [*overrides, (TABLE_OPTIMIZER, "sgd")], "auto.yaml")
    assert TABLE_LR not in sgd and TABLE_DECAY not in sgd and sgd[DROPOUT] == 0.5


def test_a_preset_base_without_prepared_data_is_refused(tmp_path: Path) -> None:
    from recforge.trainer.presets import TABLE_LR

    base = read_base_config(str(REPO / "configs" / "sasrec" / "auto.yaml"))
    with pytest.raises(SpaceError) as raised:
        preset_values(base, [("data.data_dir", str(tmp_path / "none"))], "auto.yaml")
    assert "--config auto.yaml: preset 'auto' derives its settings" in str(raised.value)
    assert "recforge data prepare" in str(raised.value)
    # A config that synthesises its data gets it generated, as fit would.
    synthesized = [
        ("data.data_dir", str(tmp_path / "synth")),
        ("data.synthesize", {"users": 100, "items": 80, "mean_length": 6, "seed": 0}),
    ]
    assert preset_values(base, synthesized, "auto.yaml")[TABLE_LR] == 0.13
    two_tower = {
        "preset": "auto",
        "model": {"class_path": "recforge.trainer.two_tower_module.TwoTowerModule"},
        "data": {"data_dir": str(tmp_path)},
    }
    with pytest.raises(SpaceError, match="derives sasrec settings"):
        preset_values(two_tower, [], "tt.yaml")


def _draws(sampler: optuna.samplers.BaseSampler, n: int) -> list[float]:
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: (t.suggest_float("x", 0.0, 1.0) - 0.3) ** 2, n_trials=n)
    return [t.params["x"] for t in study.trials]


def test_tpe_models_the_results_after_the_startup_trials() -> None:
    random = _draws(optuna.samplers.RandomSampler(seed=3), 4)
    early = _draws(make_sampler(2, seed=3), 4)
    assert early[:2] == random[:2]
    assert early[2:] != random[2:]
    assert _draws(make_sampler(10, seed=3), 4) == random


def test_negative_startup_trials_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--config", "c.yaml", "--space", "s.yaml", "--trials", "2"]
    assert tune_main([*argv, "--sampler-startup-trials", "-1"]) == 2
    assert "--sampler-startup-trials must be >= 0" in capsys.readouterr().err


def test_a_stepped_float_reads_as_written() -> None:
    dropout = parse_param("m.dropout", {"type": "float", "low": 0.1, "high": 0.5, "step": 0.1})
    noisy = 0.1 + 2 * 0.1
    assert noisy != 0.3
    assert dropout.suggest(optuna.trial.FixedTrial({"m.dropout": noisy})) == 0.3
    decay = parse_param("m.decay", {"type": "float", "low": 0.0, "high": 0.003, "step": 0.0005})
    assert decay.tidy(0.0015000000000000002) == 0.0015
    shifted = parse_param("m.t", {"type": "float", "low": 0.05, "high": 0.45, "step": 0.1})
    assert shifted.tidy(0.05 + 0.1 * 2) == 0.25
    free = parse_param("m.lr", {"type": "float", "low": 1e-4, "high": 1e-2, "log": True})
    assert free.tidy(0.30000000000000004) == 0.30000000000000004  # no grid: left as drawn


def test_the_best_value_is_tidied_on_the_grid_it_was_drawn_from() -> None:
    from recforge.trainer.tuning.study import _as_drawn

    grid = optuna.distributions.FloatDistribution(0.05, 0.45, step=0.1)
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    drawn = 0.05 + 0.1 * 2
    trial = optuna.trial.create_trial(
        params={"m.t": drawn, "m.lr": 0.0012345},
        distributions={"m.t": grid, "m.lr": lr},
        value=1.0,
    )
    # A space edited to step 0.1 from 0 would round 0.25 to 0.2 (or 0.3); the trial's own grid
    # keeps it.
    assert _as_drawn(trial, "m.t") == 0.25
    assert _as_drawn(trial, "m.lr") == 0.0012345


def test_the_base_trial_takes_what_the_config_leaves_to_the_class_defaults(
    tmp_path: Path,
) -> None:
    # A tidy config states only what differs from the defaults; its base trial must still be
    # the config itself, not a draw for the keys it leaves out. Read from fit's --print_config.
    from recforge.trainer.optimization import DenseOptimizerConfig
    from recforge.trainer.tuning.base_config import base_trial_values

    base = read_base_config(str(REPO / "configs" / "sasrec" / "tiny.yaml"))
    del base["model"]["init_args"]["optimizer"]
    config = tmp_path / "tidy.yaml"
    config.write_text(dump_yaml(base))
    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        "model.init_args.optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}\n"
        "model.init_args.model.dropout: {type: float, low: 0.0, high: 0.5, step: 0.1}\n"
    )
    fit_args = ["--data.data_dir", str(tmp_path / "data"), "--model.init_args.model.dropout", "0.2"]
    values = base_trial_values(load_space(space_file), base, fit_args, str(config))
    assert values == {
        "model.init_args.optimizer.lr": DenseOptimizerConfig().lr,
        "model.init_args.model.dropout": 0.2,  # the pass-through override, not the YAML's 0.1
    }


def test_a_default_the_space_cannot_reach_is_refused_naming_fit_defaults() -> None:
    param = parse_param("model.init_args.optimizer.lr", {"type": "float", "low": 1e-2, "high": 0.1})
    with pytest.raises(SpaceError, match=r"is 0\.001, fit's default .*outside"):
        base_values([param], {}, [], "base.yaml", defaults={param.key: 1e-3})
