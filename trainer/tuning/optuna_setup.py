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
    if not url.startswith(("sqlite:", "postgresql", "mysql")):
        return url
    # Parallel trials write to one sqlite file: wait for its lock instead of failing at 5 s.
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {}
    extra = {"heartbeat_interval": 10, "grace_period": 60} if heartbeat else {}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, **extra)


def redact_url(url: str) -> str:
    """``url`` with its credentials (``user:password@``) masked, for logs and run params."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
