"""The base config of a ``recforge tune`` study, read the way ``recforge fit`` reads it: its
YAML, the values its ``preset`` derives from the prepared data, the one trial of its own values
that ``--enqueue-base`` queues, and what it and the pass-through arguments say about where the
runs go (the value of a passed flag, fit's default experiment name)."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from recforge.trainer.tuning.space import (
    Param,
    SpaceError,
    dotted_pairs,
    get_dotted,
    load_yaml,
    set_dotted,
)


def read_base_config(path: str) -> dict:
    """The ``--config`` file, read as fit reads it (:func:`load_yaml`)."""
    try:
        data = load_yaml(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SpaceError(f"--config {path}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise SpaceError(f"--config {path}: not a YAML mapping")
    return data


def base_trial_values(
    space: list[Param], base: dict, fit_args: list[str], source: str
) -> dict[str, Any]:
    """The trial ``--enqueue-base`` queues: each searched key as ``fit`` would set it from the
    command line, the YAML, the preset, else the class default."""
    overrides = dotted_pairs(fit_args)
    derived = preset_values(base, overrides, source)
    unset = unset_keys(space, base, overrides, derived)
    defaults = fit_defaults(source, fit_args, unset) if unset else {}
    return base_values(space, base, overrides, source, derived, defaults)


def base_values(
    space: list[Param],
    base: dict,
    overrides: list[tuple[str, Any]],
    source: str,
    derived: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The base config's values of the searched keys, pass-through overrides applied: the
    trial ``--enqueue-base`` runs. ``derived`` (dotted key -> value) are the values the
    config's preset derives, which the YAML and the overrides win over, as in ``fit``;
    ``defaults`` are fit's own for the keys none of those sets. A value outside the space is an
    error, since TPE would learn from a point the search cannot reach."""
    config = _with_overrides(base, overrides)
    values = {}
    for param in space:
        found, value = get_dotted(config, param.key)
        where = f"in --config {source} (or its overrides)"
        if not found and derived and param.key in derived:
            found, value, where = True, derived[param.key], f"derived by {source}'s preset"
        if not found and defaults and param.key in defaults:
            found, value = True, defaults[param.key]
            where = f"fit's default (`recforge fit --config {source} --print_config`)"
        if not found:
            continue
        problem = param.rejects(value)
        if problem:
            raise SpaceError(
                f"--enqueue-base: {param.key} is {value!r}, {where}: {problem}; widen the space, "
                "set the key in the config, or leave --enqueue-base out"
            )
        values[param.key] = int(value) if param.kind == "int" else value
    if not values:
        raise SpaceError(
            f"--enqueue-base: no searched key has a value in --config {source}, its overrides, "
            "its preset or fit's defaults, so its trial would be a sampled one"
        )
    return values


def preset_values(base: dict, overrides: list[tuple[str, Any]], source: str) -> dict[str, Any]:
    """The values (dotted key -> value) that the preset of the base config, after its
    overrides, derives from its data, as ``fit`` would; {} without a preset."""
    config = _with_overrides(base, overrides)
    name = config.get("preset")
    if name is None:
        return {}
    from recforge.families import UnknownFamilyError
    from recforge.trainer.presets import TABLE_OPTIMIZER, PresetError, resolve_preset

    try:
        resolved = resolve_preset(
            str(name),
            str(get_dotted(config, "model.class_path")[1]),
            str(get_dotted(config, "data.data_dir")[1]),
            get_dotted(config, "data.synthesize")[1],
            get_dotted(config, TABLE_OPTIMIZER)[1],
        )
    except (PresetError, UnknownFamilyError) as exc:
        raise SpaceError(f"--enqueue-base: --config {source}: {exc}") from None
    assert resolved is not None  # None only under --print_config
    return {key: d.value for key, d in resolved[0].items()}


def unset_keys(
    space: list[Param],
    base: dict,
    overrides: list[tuple[str, Any]],
    derived: Mapping[str, Any],
) -> list[str]:
    """The searched keys that neither the base config, its overrides nor its preset set."""
    config = _with_overrides(base, overrides)
    return [p.key for p in space if not get_dotted(config, p.key)[0] and p.key not in derived]


def fit_defaults(config: str, fit_args: list[str], keys: list[str]) -> dict[str, Any]:
    """What ``fit`` would use for ``keys`` (dotted) when the config leaves them to fit's
    defaults: read from ``recforge fit --print_config`` itself, so the base trial is the base
    config even when a tidy config states only what differs from the defaults. Keys the printed
    config lacks (unknown to fit, or spelled differently) are left out; the caller names them."""
    command = [sys.executable, "-m", "recforge", "fit", "--config", config, *fit_args]
    failed = f"--enqueue-base: --config {config}: `recforge fit --print_config`"
    unknown = f"so fit's defaults for {', '.join(keys)} are unknown"
    try:
        proc = subprocess.run(
            [*command, "--print_config"], capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SpaceError(f"{failed} did not run ({exc}), {unknown}") from None
    if proc.returncode != 0:
        tail = proc.stderr.strip()[-800:]
        raise SpaceError(f"{failed} failed (exit {proc.returncode}), {unknown}: {tail}")
    try:
        printed = load_yaml(proc.stdout)
    except yaml.YAMLError as exc:
        raise SpaceError(f"{failed} printed no readable YAML ({exc}), {unknown}") from None
    if not isinstance(printed, dict):
        raise SpaceError(f"{failed} printed no YAML mapping, {unknown}")
    found = {}
    for key in keys:
        present, value = get_dotted(printed, key)
        if present:
            found[key] = value
    return found


def _with_overrides(base: dict, overrides: list[tuple[str, Any]]) -> dict:
    config = copy.deepcopy(base)
    for key, value in overrides:
        set_dotted(config, key, value)
    return config


def passed_value(fit_args: list[str], flag: str) -> str | None:
    """The value of ``flag`` among the arguments passed through to fit (last one wins)."""
    value = None
    for i, arg in enumerate(fit_args):
        if arg == flag and i + 1 < len(fit_args):
            value = fit_args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def default_experiment(base: dict, fit_args: list[str]) -> str:
    """``fit``'s default experiment name, ``<family>-<dataset directory>``, so that the parent
    run and its trials share an experiment."""
    from recforge.families import UnknownFamilyError, family_of_module

    model = base.get("model") or {}
    try:
        family = family_of_module(str(model.get("class_path", ""))).name
    except UnknownFamilyError:
        family = "recforge"
    data_dir = passed_value(fit_args, "--data.data_dir") or (base.get("data") or {}).get("data_dir")
    return f"{family}-{Path(str(data_dir or 'data')).name}"
