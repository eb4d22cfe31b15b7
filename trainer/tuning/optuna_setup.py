"""The Optuna pieces of a study, built from their specs: the pruner (which the tuner and every
trial subprocess build alike, from the spec in the trial's environment), the TPE sampler and the
storage. Kept apart from the tuner so a trial imports only these.
"""

from __future__ import annotations

from typing import Any

import optuna


def make_pruner(spec: dict) -> optuna.pruners.BasePruner:
    """The pruner ``spec`` describes; the tuner and every trial build the same one."""
    if spec["name"] == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=spec["n_startup_trials"], n_warmup_steps=spec["n_warmup_steps"]
        )
    if spec["name"] == "hyperband":
        # Resource = epochs; max_resource "auto" is the epochs of the first finished trial.
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def make_sampler(startup_trials: int, seed: int) -> optuna.samplers.BaseSampler:
    """TPE; it draws at random until ``startup_trials`` trials of the study (any tuner's) have
    completed or been pruned."""
    return optuna.samplers.TPESampler(n_startup_trials=startup_trials, seed=seed)


def make_storage(url: str, heartbeat: bool = True) -> Any:
    """An RDB storage for SQLAlchemy URLs (heartbeats, so trials of a killed tuner are failed
    instead of staying RUNNING forever), anything else as Optuna reads it (e.g. journal)."""
    backend = url.split(":", 1)[0].split("+", 1)[0]  # sqlite+pysqlite: is sqlite too
    if backend not in ("sqlite", "postgresql", "mysql"):
        return url
    # Parallel trials write to one sqlite file: wait for its lock instead of failing at 5 s.
    kwargs = {"connect_args": {"timeout": 60}} if backend == "sqlite" else {}
    extra = {"heartbeat_interval": 10, "grace_period": 60} if heartbeat else {}
    storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, **extra)
    if backend == "sqlite":
        _lock_on_begin(storage.engine)
    return storage


def _lock_on_begin(engine: Any) -> None:
    """Make every sqlite transaction after the storage's set-up take the write lock when it
    begins.

    pysqlite runs a SELECT outside any transaction, so Optuna's "claim a WAITING trial"
    (read the state, then set RUNNING) is not atomic there: two workers can both read WAITING
    and both run the enqueued trial (optuna/optuna#4002; here, two fits writing one trial
    directory). ``BEGIN IMMEDIATE`` makes the second wait for the first's commit and then read
    RUNNING. SQLAlchemy's documented pysqlite recipe; the transactions are short.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    # Connections pooled while the storage set itself up predate the listeners.
    engine.dispose()


def redact_url(url: str) -> str:
    """``url`` with its credentials (``user:password@``) masked, for logs and run params."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
