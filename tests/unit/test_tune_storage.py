"""The study storage under parallel trials: what ``recforge tune --jobs J`` and a second tuner
on the same sqlite file rely on."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import optuna
from sqlalchemy import event

from recforge.trainer.tuning.optuna_setup import make_storage


def _ask_at_once(study: optuna.Study, workers: int) -> list[int]:
    """The trial numbers ``workers`` threads get from ``study.ask()`` started together, as
    ``study.optimize(n_jobs=workers)`` starts them."""
    barrier = threading.Barrier(workers)
    claimed: list[int] = []
    lock = threading.Lock()

    def ask() -> None:
        barrier.wait()
        number = study.ask().number
        with lock:
            claimed.append(number)

    threads = [threading.Thread(target=ask) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return claimed


def _slow_trial_reads(engine: object) -> None:
    """Widen the window between reading a trial's state and writing it, so the race shows every
    time instead of now and then (the real engine and file, only slower)."""

    @event.listens_for(engine, "after_cursor_execute")
    def _pause(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.lstrip().startswith("SELECT") and "WHERE trials.trial_id = ?" in statement:
            time.sleep(0.05)


def test_an_enqueued_trial_is_handed_to_one_worker_only(tmp_path: Path) -> None:
    # pysqlite reads outside a transaction, so two workers could both see the enqueued (base)
    # trial WAITING and both claim it (optuna/optuna#4002): two fits in one trial directory.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        _claims_are_unique(tmp_path)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _claims_are_unique(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    workers = 4
    for round_ in range(3):
        storage = make_storage(url, heartbeat=False)
        _slow_trial_reads(storage.engine)
        study = optuna.create_study(study_name=f"race-{round_}", storage=storage)
        study.enqueue_trial({"x": 0.5})
        claimed = _ask_at_once(study, workers)
        assert sorted(claimed) == list(range(workers)), f"round {round_}: trials {claimed}"
        assert not study.get_trials(states=(optuna.trial.TrialState.WAITING,))
