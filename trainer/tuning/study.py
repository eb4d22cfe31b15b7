"""``recforge tune``: an Optuna study whose trials are ``recforge fit`` runs.

Each trial is a ``recforge fit`` subprocess of the base config plus the sampled values as dotted
command-line overrides. A subprocess rather than a fit in this process: a trial's memory, threads
and global state (seeds, Lightning, TorchRec's process group) end with it, a crashed trial fails
alone, and ``--jobs J`` is J processes. The trial reports its validation metric per epoch to the
study and prunes itself (``report.py``); this process samples (TPE, seeded), waits, and tells
the study the trial's best epoch, or that it was pruned or failed.

The study lives in an Optuna storage (default: ``optuna.db`` beside the MLflow sqlite store), so a
tuner that is killed and started again with the same study name continues: COMPLETE and PRUNED
trials count towards ``--trials``. One MLflow parent run per study (its id is kept in the study,
so a restart reopens it) holds every trial as a child run, the best config as YAML and the plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from recforge.trainer.tuning.base_config import (
    base_trial_values,
    default_experiment,
    passed_value,
    read_base_config,
)
from recforge.trainer.tuning.lifetime import die_with_parent
from recforge.trainer.tuning.optuna_setup import make_pruner, make_sampler, make_storage, redact_url
from recforge.trainer.tuning.report import ENV, PRUNED_ATTR, RUN_ATTR
from recforge.trainer.tuning.space import (
    Param,
    SpaceError,
    cli_value,
    dotted_pairs,
    dump_yaml,
    load_space,
    set_dotted,
    tidy_float,
)

log = logging.getLogger(__name__)

DEFAULT_METRIC = "val/ndcg@10_filtered"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
BASE_ATTR = "recforge_base_config"


class TrialFailed(RuntimeError):
    """A trial's ``recforge fit`` exited with an error or reported nothing."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recforge tune",
        description="Optuna search (TPE, pruning on the validation metric per epoch) over "
        "`recforge fit` runs. Arguments it does not know (e.g. --trainer.max_epochs 5) are "
        "passed to every trial's fit.",
    )
    parser.add_argument("--config", required=True, help="the base `recforge fit` config")
    parser.add_argument("--space", required=True, help="search-space YAML (README)")
    parser.add_argument(
        "--trials", type=int, required=True, help="COMPLETE + PRUNED trials the study ends with"
    )
    parser.add_argument(
        "--storage",
        help="Optuna storage URL (default: sqlite:///<dir of the MLflow sqlite db, else runs>/"
        "optuna.db)",
    )
    parser.add_argument(
        "--study-name", help="default: <experiment>-<space file name>; same name: continue"
    )
    parser.add_argument("--jobs", type=int, default=1, help="trials run at once (processes)")
    parser.add_argument("--timeout", type=float, help="seconds; no new trial starts after it")
    parser.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median")
    parser.add_argument(
        "--pruner-startup-trials",
        type=int,
        default=5,
        help="median: no pruning until this many trials completed (default 5)",
    )
    parser.add_argument(
        "--pruner-warmup-epochs",
        type=int,
        default=0,
        help="median: a trial is not pruned in its first N epochs (default 0)",
    )
    parser.add_argument(
        "--enqueue-base",
        action="store_true",
        help="run the base config as one trial first (its own values of the searched keys: "
        "what its preset derives, the YAML, then the pass-through overrides; for keys none of "
        "these sets, fit's default from --print_config), so the study shows what the search "
        "gained over it; once per study",
    )
    parser.add_argument(
        "--sampler-startup-trials",
        type=int,
        default=10,
        help="TPE draws at random until this many trials of the study have completed or been "
        "pruned (default 10, Optuna's; a finished base trial counts, failed and running ones "
        "do not); lower it for a short study around a known config",
    )
    parser.add_argument("--seed", type=int, help="TPE seed (default: the config's seed_everything)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help=f"default {DEFAULT_METRIC}")
    parser.add_argument("--direction", choices=("maximize", "minimize"), default="maximize")
    return parser


def main(argv: list[str]) -> int:
    args, fit_args = build_parser().parse_known_args(argv)
    if args.trials < 1 or args.jobs < 1:
        print("recforge tune: error: --trials and --jobs must be >= 1", file=sys.stderr)
        return 2
    if args.sampler_startup_trials < 0:
        print("recforge tune: error: --sampler-startup-trials must be >= 0", file=sys.stderr)
        return 2
    try:
        space = load_space(args.space)
        base = read_base_config(args.config)
        base_params = None
        if args.enqueue_base:
            base_params = base_trial_values(space, base, fit_args, args.config)
    except SpaceError as exc:
        print(f"recforge tune: error: {exc}", file=sys.stderr)
        return 2
    return Tuner(args, fit_args, space, base, base_params).run()


def _as_drawn(trial: optuna.trial.FrozenTrial, key: str) -> Any:
    """``trial``'s value of ``key`` as fit received it: tidied on the grid the trial was drawn
    from, which a space file edited since may no longer hold."""
    value, drawn = trial.params[key], trial.distributions[key]
    if isinstance(drawn, optuna.distributions.FloatDistribution) and drawn.step is not None:
        return tidy_float(value, drawn.low, drawn.step)
    return value


class Tuner:
    def __init__(
        self,
        args: argparse.Namespace,
        fit_args: list[str],
        space: list[Param],
        base: dict,
        base_params: dict[str, Any] | None = None,
    ) -> None:
        from recforge.trainer.tracking.logger import TrackingConfig, resolve_tracking

        self.args, self.fit_args, self.space, self.base = args, fit_args, space, base
        self.base_params = base_params
        mlflow_section = base.get("mlflow") or {}
        uri = passed_value(fit_args, "--mlflow.tracking_uri") or mlflow_section.get("tracking_uri")
        self.tracking_uri, self.artifact_location = resolve_tracking(
            TrackingConfig(
                tracking_uri=uri, artifact_location=mlflow_section.get("artifact_location")
            )
        )
        self.experiment = (
            passed_value(fit_args, "--mlflow.experiment_name")
            or mlflow_section.get("experiment_name")
            or default_experiment(base, fit_args)
        )
        self.study_name = args.study_name or f"{self.experiment}-{Path(args.space).stem}"
        if args.storage:
            self.storage_url = args.storage
        else:
            # Beside the MLflow sqlite store (one place to back up), else under runs/.
            where = (
                Path(self.tracking_uri[len("sqlite:///") :]).parent
                if self.tracking_uri.startswith("sqlite:///")
                else Path("runs").resolve()
            )
            where.mkdir(parents=True, exist_ok=True)
            self.storage_url = f"sqlite:///{where / 'optuna.db'}"
        seed = args.seed if args.seed is not None else base.get("seed_everything")
        self.seed = int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else 0
        # Only the median pruner reads the start-up and warm-up settings.
        self.pruner_spec = (
            {
                "name": "median",
                "n_startup_trials": args.pruner_startup_trials,
                "n_warmup_steps": args.pruner_warmup_epochs,
            }
            if args.pruner == "median"
            else {"name": args.pruner}
        )
        self.out_dir = Path("runs").resolve() / f"tune-{self.study_name}"
        self.last_failure: str | None = None

    def run(self) -> int:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Heartbeats are marked experimental; the warning is nothing a user acts on.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        study = optuna.create_study(
            study_name=self.study_name,
            storage=make_storage(self.storage_url),
            pruner=make_pruner(self.pruner_spec),
            direction=self.args.direction,
            load_if_exists=True,
        )
        # Offset by the trials already in the study: a restarted tuner with the same seed would
        # otherwise draw its first (random, start-up) trials again. Still reproducible.
        study.sampler = make_sampler(
            self.args.sampler_startup_trials, self.seed + len(study.trials)
        )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        from mlflow import MlflowClient

        self.client = MlflowClient(self.tracking_uri)
        self.parent = self._parent_run(study)
        done = len(study.get_trials(deepcopy=False, states=COUNTED))
        remaining = max(0, self.args.trials - done)
        if self.base_params is not None and remaining:
            self._enqueue_base(study)
        log.info(
            "tune: study %r in %s: %d trial(s) done, %d to run (%d at a time); parent run %s",
            self.study_name,
            redact_url(self.storage_url),
            done,
            remaining,
            self.args.jobs,
            self.parent,
        )
        status = "FINISHED"
        try:
            if remaining:
                study.optimize(
                    self._objective,
                    n_trials=remaining,
                    n_jobs=self.args.jobs,
                    timeout=self.args.timeout,
                    catch=(TrialFailed,),
                    # Another tuner on the same study counts too: stop at --trials in all.
                    callbacks=[optuna.study.MaxTrialsCallback(self.args.trials, states=COUNTED)],
                )
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except Exception:
            status = "FAILED"
            raise
        finally:
            self._summarise(study)
            self.client.set_terminated(self.parent, status)
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            print(
                f"recforge tune: error: no trial completed (trial logs in {self.out_dir})"
                + (f"; last failure: {self.last_failure}" if self.last_failure else ""),
                file=sys.stderr,
            )
            return 1
        return 0

    def _parent_run(self, study: optuna.Study) -> str:
        """The study's MLflow parent run: reopened after a restart, else created."""
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
            except Exception as exc:  # deleted run or another tracking store: start a new one
                log.warning("tune: parent run %s not reopened (%s); starting one", run_id, exc)
            else:
                self._say_if_pruner_changed(run_id)
                return run_id
        experiment = self.client.get_experiment_by_name(self.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(
                self.experiment, artifact_location=self.artifact_location
            )
        )
        run = self.client.create_run(
            experiment_id,
            run_name=f"{self.study_name}-tune",
            tags={"recforge.tune.study": self.study_name, "recforge.tune.role": "parent"},
        )
        run_id = run.info.run_id
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        for key, value in {
            "tune.config": self.args.config,
            "tune.storage": redact_url(self.storage_url),
            "tune.sampler": (
                f"TPE(seed={self.seed}, n_startup_trials={self.args.sampler_startup_trials})"
            ),
            "tune.pruner": json.dumps(self.pruner_spec),
            "tune.metric": self.args.metric,
            "tune.direction": self.args.direction,
            "tune.fit_args": " ".join(self.fit_args),
        }.items():
            self.client.log_param(run_id, key, value[:6000])
        self.client.log_artifact(run_id, self.args.space, "tune")
        self.client.log_artifact(run_id, self.args.config, "tune")
        return run_id

    def _say_if_pruner_changed(self, parent: str) -> None:
        """MLflow params cannot change, so the parent keeps the first sitting's pruner."""
        try:
            first = json.loads(self.client.get_run(parent).data.params["tune.pruner"])
        except Exception:  # a parent from before the param, or unreadable: nothing to compare
            return
        if first != self.pruner_spec:
            log.info(
                "tune: this sitting prunes with %s, the parent run's tune.pruner says %s; "
                "each trial's run records its own (tag recforge.tune.pruner)",
                json.dumps(self.pruner_spec),
                json.dumps(first),
            )

    def _objective(self, trial: optuna.Trial) -> float:
        params = {p.key: p.suggest(trial) for p in self.space}
        name = f"trial-{trial.number}"
        command = [
            sys.executable,
            "-m",
            "recforge",
            "fit",
            "--config",
            self.args.config,
            "--mlflow.tracking_uri",
            self.tracking_uri,
            "--mlflow.experiment_name",
            self.experiment,
            "--mlflow.run_name",
            f"{self.study_name}-{name}",
            "--mlflow.parent_run_id",
            self.parent,
            # Trials are compared on validation; testing and registering is for the winner.
            "--mlflow.registered_model_name",
            "null",
            "--test_after_fit",
            "false",
            # One directory per trial: parallel trials would race for the next version_N.
            "--trainer.logger.init_args.save_dir",
            str(self.out_dir.parent),
            "--trainer.logger.init_args.name",
            self.out_dir.name,
            "--trainer.logger.init_args.version",
            name,
            *self.fit_args,
        ]
        for key, value in params.items():
            command += [f"--{key}", cli_value(value)]
        env = {
            **os.environ,
            ENV: json.dumps(
                {
                    "storage": self.storage_url,
                    "study_name": self.study_name,
                    # Optuna has no public id of a trial; the child opens it with Trial(study, id).
                    "trial_id": trial._trial_id,
                    "pruner": self.pruner_spec,
                    "monitor": self.args.metric,
                }
            ),
        }
        log_path = self.out_dir / f"{name}.log"
        is_base = bool(trial.user_attrs.get(BASE_ATTR))
        log.info(
            "tune: %s%s %s",
            name,
            " (the base config)" if is_base else "",
            " ".join(f"{k}={v}" for k, v in params.items()),
        )
        with open(log_path, "w") as out:
            rc = subprocess.run(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
            ).returncode
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        child = frozen.user_attrs.get(RUN_ATTR)
        if child:
            self.client.log_artifact(child, str(log_path), "tune")
            # The parent's params are those of the sitting that created it; a restart may prune
            # differently, so each trial records its own.
            self.client.set_tag(child, "recforge.tune.pruner", json.dumps(self.pruner_spec))
            if is_base:
                self.client.set_tag(child, "recforge.tune.base", "true")
        if rc != 0:
            self._tag(child, "FAIL")
            tail = log_path.read_text()[-1500:]
            self.last_failure = f"{name}: recforge fit exited {rc} ({log_path}):\n{tail}"
            if not trial.study.get_trials(deepcopy=False, states=COUNTED):
                # Nothing in this study ever ran to the end: most likely the setup (a config key
                # the CLI does not know, missing data). Fail once, not --trials times.
                trial.study.stop()
            raise TrialFailed(self.last_failure)
        if PRUNED_ATTR in frozen.user_attrs:
            self._tag(child, "PRUNED")
            raise optuna.TrialPruned(f"{name} pruned after epoch {frozen.user_attrs[PRUNED_ATTR]}")
        values = list(frozen.intermediate_values.values())
        if not values:
            self._tag(child, "FAIL")
            raise TrialFailed(f"{name}: no {self.args.metric} was reported ({log_path})")
        self._tag(child, "COMPLETE")
        # The trial's best epoch: the one its checkpoint keeps and a re-run would be tested at.
        return max(values) if self.args.direction == "maximize" else min(values)

    def _enqueue_base(self, study: optuna.Study) -> None:
        """Queue the base config's trial unless the study has one that ran or will run: a
        restarted (or second) tuner does not repeat it, but one that failed is run again."""
        # A base trial whose tuner was killed is RUNNING until its heartbeat is checked.
        optuna.storages.fail_stale_trials(study)
        live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
        trials = study.get_trials(deepcopy=False, states=live)
        if any(t.user_attrs.get(BASE_ATTR) for t in trials):
            return
        sampled = [p.key for p in self.space if p.key not in self.base_params]
        if sampled:
            log.warning(
                "tune: --enqueue-base: `recforge fit --print_config` of the base config has no "
                "key %s (spelled differently there, or unknown to fit); its trial samples them",
                ", ".join(sampled),
            )
        study.enqueue_trial(self.base_params, user_attrs={BASE_ATTR: True})

    def _tag(self, run_id: str | None, state: str) -> None:
        if run_id:
            self.client.set_tag(run_id, "recforge.tune.state", state)

    def _summarise(self, study: optuna.Study) -> None:
        """Counts, the best config and the plots on the parent run."""
        trials = study.get_trials(deepcopy=False)
        counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
        for state in ("complete", "pruned", "fail"):
            self.client.log_metric(self.parent, f"tune/trials_{state}", counts[state])
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not complete:
            return
        best = study.best_trial
        best_params = {key: _as_drawn(best, key) for key in best.params}
        config = read_base_config(self.args.config)
        # The arguments every trial got, then the best values: `recforge fit --config` on this
        # file trains the best trial's configuration.
        for key, value in [*dotted_pairs(self.fit_args), *best_params.items()]:
            set_dotted(config, key, value)
        best_yaml = (
            f"# recforge tune: best of study {self.study_name!r} (trial {best.number}, "
            f"{self.args.metric} {best.value:.6f})\n" + dump_yaml(config)
        )
        (self.out_dir / "best_config.yaml").write_text(best_yaml)
        self.client.log_text(self.parent, best_yaml, "tune/best_config.yaml")
        self.client.log_metric(self.parent, "tune/best_value", best.value)
        self.client.set_tag(self.parent, "recforge.tune.best_trial", str(best.number))
        if best.user_attrs.get(RUN_ATTR):
            self.client.set_tag(self.parent, "recforge.tune.best_run", best.user_attrs[RUN_ATTR])
        self._plots(study, len(complete))
        pick = max if self.args.direction == "maximize" else min
        epochs = pick(best.intermediate_values.items(), key=lambda kv: kv[1])[0] + 1
        self.client.set_tag(self.parent, "recforge.tune.best_epochs", str(epochs))
        refit = (
            f"recforge fit --config {self.out_dir / 'best_config.yaml'} "
            f"--data.train_through validation --trainer.max_epochs {epochs}"
        )
        bases = [t for t in trials if t.user_attrs.get(BASE_ATTR)]
        base = next((t for t in bases if t.state == TrialState.COMPLETE), None)
        if base is not None:
            self.client.log_metric(self.parent, "tune/base_value", base.value)
            said_base = f"; the base config (trial {base.number}): {base.value:.5f}"
        elif bases:
            said_base = f"; the base config (trial {bases[-1].number}): {bases[-1].state.name}"
        else:
            said_base = ""
        print(
            f"recforge tune: {counts['complete']} complete, {counts['pruned']} pruned, "
            f"{counts['fail']} failed; best trial {best.number}: {self.args.metric} "
            f"{best.value:.5f} {best_params}"
            + said_base
            + f"\nbest config: {self.out_dir / 'best_config.yaml'}"
            + f"\nrefit it on the validation items too (docs/architecture.md §6): {refit}"
        )

    def _plots(self, study: optuna.Study, complete: int) -> None:
        import matplotlib

        matplotlib.use("Agg")  # no display; the plots are files
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as optuna_plots

        plots = {"optimization_history.png": optuna_plots.plot_optimization_history}
        if complete >= 2 and len(self.space) >= 1:
            plots["param_importances.png"] = optuna_plots.plot_param_importances
        else:
            self.client.log_text(
                self.parent,
                f"Parameter importances need at least 2 complete trials; the study has {complete}.",
                "tune/param_importances.txt",
            )
        with tempfile.TemporaryDirectory() as tmp:
            for name, plot in plots.items():
                try:
                    axes = plot(study)
                    figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
                    figure.savefig(Path(tmp) / name, dpi=100, bbox_inches="tight")
                    plt.close(figure)
                except Exception as exc:  # e.g. importances of parameters that never varied
                    log.warning("tune: %s not drawn (%s: %s)", name, type(exc).__name__, exc)
                    continue
                self.client.log_artifact(self.parent, str(Path(tmp) / name), "tune")
