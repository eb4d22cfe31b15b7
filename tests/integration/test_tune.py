"""`recforge tune` for real: Optuna trials as `recforge fit` subprocesses on the tiny config,
pruning on the validation metric, MLflow parent/child runs read back through MLflow's API, and a
study that continues when the tuner is started again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from recforge.trainer.tuning.space import load_space

REPO = Path(__file__).resolve().parents[2]
RECFORGE = str(Path(sys.executable).with_name("recforge"))
TINY = str(REPO / "configs" / "sasrec" / "tiny.yaml")
SPACE = str(REPO / "configs" / "tune" / "sasrec_tiny_space.yaml")
STUDY = "ci-tune"


def tune(tmp: Path, trials: int, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [
            RECFORGE,
            "tune",
            "--config",
            TINY,
            "--space",
            SPACE,
            "--trials",
            str(trials),
            "--study-name",
            STUDY,
            # Prune from the second trial on, at any epoch: on the tiny data the space's low
            # learning rates fall below the first trial's curve (seeded, so always the same).
            "--pruner",
            "median",
            "--pruner-startup-trials",
            "1",
            "--pruner-warmup-epochs",
            "0",
            "--seed",
            "0",
            *extra,
            # Passed through to every trial's fit.
            "--data.data_dir",
            str(tmp / "data"),
            "--trainer.max_epochs",
            "3",
        ],
        cwd=tmp,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_tune_prunes_nests_runs_and_continues_after_restart(tmp_path: Path) -> None:
    tune(tmp_path, 2)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"  # default: beside ./mlflow.db
    assert len(optuna.load_study(study_name=STUDY, storage=storage).trials) == 2

    # Started again on the same storage: the two trials count, one more runs (pruned from the
    # second epoch on, which trial 2's run records; the parent keeps the first sitting's).
    restart = tune(tmp_path, 3, "--jobs", "2", "--pruner-warmup-epochs", "1")
    assert "each trial's run records its own" in restart.stdout + restart.stderr
    study = optuna.load_study(study_name=STUDY, storage=storage)
    states = [t.state for t in study.trials]
    assert len(states) == 3, states
    assert states.count(optuna.trial.TrialState.PRUNED) >= 1, states
    assert states.count(optuna.trial.TrialState.COMPLETE) >= 1, states
    for trial in study.trials:
        # Every trial reported its validation metric per epoch, and none ran past its last.
        assert 1 <= len(trial.intermediate_values) <= 3, trial.number
    # A pruned trial stopped early. Trials 0 and 1 ran one at a time, with draws fixed by
    # --seed; under --jobs 2 Optuna reseeds its sampler per worker thread from the OS, so trial
    # 2's draw, and the epoch it is pruned at (if it is), varies from run to run.
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert any(len(t.intermediate_values) < 3 for t in pruned), states

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    parents = [r for r in runs if r.data.tags.get("recforge.tune.role") == "parent"]
    assert len(parents) == 1, "a restart reopens the study's parent run"
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3
    assert sorted(r.data.tags["recforge.tune.state"] for r in children) == sorted(
        s.name for s in states
    )
    for child in children:
        assert "val/ndcg_at_10_filtered" in child.data.metrics
    warmups = sorted(
        (r.data.tags["mlflow.runName"], json.loads(r.data.tags["recforge.tune.pruner"]))
        for r in children
    )
    assert [w["n_warmup_steps"] for _, w in warmups] == [0, 0, 1], warmups
    assert json.loads(parent.data.params["tune.pruner"])["n_warmup_steps"] == 0

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert {"tune/best_config.yaml", "tune/optimization_history.png"} <= artifacts
    complete = states.count(optuna.trial.TrialState.COMPLETE)
    importance = "tune/param_importances.png" if complete >= 2 else "tune/param_importances.txt"
    assert importance in artifacts, artifacts
    assert parent.data.metrics["tune/best_value"] == study.best_value
    # The refit it prints trains as many epochs as the best trial needed to reach its best.
    values = study.best_trial.intermediate_values
    epochs = max(values, key=lambda epoch: values[epoch]) + 1
    assert parent.data.tags["recforge.tune.best_epochs"] == str(epochs)
    assert f"--data.train_through validation --trainer.max_epochs {epochs}" in restart.stdout

    # The best config is the base config with the best trial's values, a stepped float as its
    # grid writes it (0.3, not Optuna's 0.30000000000000004): fit takes it as it is.
    best = yaml.safe_load(
        Path(client.download_artifacts(parent.info.run_id, "tune/best_config.yaml")).read_text()
    )
    space = {p.key: p for p in load_space(SPACE)}
    for key, value in study.best_params.items():
        node = best
        for part in key.split("."):
            node = node[part]
        assert node == space[key].tidy(value) == pytest.approx(value), key
    assert best["trainer"]["max_epochs"] == 3


def test_enqueue_base_runs_the_base_config_once(tmp_path: Path) -> None:
    from recforge.trainer.tuning.study import BASE_ATTR

    # The pass-through override is part of the base: the base trial runs what fit would.
    base = ("--enqueue-base", "--model.init_args.model.dropout", "0.2")
    first = tune(tmp_path, 1, *base)
    assert "the base config (trial 0)" in first.stdout
    tune(tmp_path, 2, *base)  # restarted: the base trial is not run again
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 2
    assert [t.number for t in study.trials if t.user_attrs.get(BASE_ATTR)] == [0]
    tiny = yaml.safe_load(Path(TINY).read_text())["model"]["init_args"]
    assert study.trials[0].params == {
        "model.init_args.optimizer.lr": tiny["optimizer"]["lr"],
        "model.init_args.embedding_optimizer.lr": tiny["embedding_optimizer"]["lr"],
        "model.init_args.model.dropout": 0.2,
        "model.init_args.model.num_layers": tiny["model"]["num_layers"],
    }

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if r.data.tags.get("recforge.tune.role") == "parent"]
    based = [r for r in runs if r.data.tags.get("recforge.tune.base") == "true"]
    assert len(based) == 1 and based[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    # The first trial is never pruned (--pruner-startup-trials 1), so the base has a value.
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
    assert parent.data.metrics["tune/base_value"] == study.trials[0].value
