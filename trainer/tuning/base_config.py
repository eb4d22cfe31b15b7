"""The base config of a ``recforge tune`` study, read the way ``recforge fit`` reads it: its
YAML (numbers as fit takes them), the values its ``preset`` derives from the prepared data, and
the one trial of its own values that ``--enqueue-base`` queues."""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from recforge.trainer.tuning.space import Param, SpaceError, get_dotted, set_dotted


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where ``1e-3`` (no dot) is a string; ``recforge fit``
    (jsonargparse) reads it as a number, so the base config is read the same way and
    ``best_config.yaml`` writes ``0.001``, not ``'1e-3'``."""


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_base_config(path: str) -> dict:
    try:
        data = yaml.load(Path(path).read_text(), Loader=_ConfigLoader)
    except (OSError, yaml.YAMLError) as exc:
        raise SpaceError(f"--config {path}: cannot read it ({exc})") from None
    if not isinstance(data, dict):
        raise SpaceError(f"--config {path}: not a YAML mapping")
    return data


def base_values(
    space: list[Param],
    base: dict,
    overrides: list[tuple[str, Any]],
    source: str,
    derived: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The base config's values of the searched keys, pass-through overrides applied: the
    trial ``--enqueue-base`` runs. ``derived`` (dotted key -> value) are the values the
    config's preset derives, which the YAML and the overrides win over, as in ``fit``. A value
    outside the space is an error, since TPE would learn from a point the search cannot
    reach."""
    config = _with_overrides(base, overrides)
    values = {}
    for param in space:
        found, value = get_dotted(config, param.key)
        if not found and derived and param.key in derived:
            found, value = True, derived[param.key]
        if not found:
            continue
        value = param.as_value(value)
        problem = param.rejects(value)
        if problem:
            raise SpaceError(
                f"--enqueue-base: {param.key} is {value!r} in --config {source} (its "
                f"overrides or its preset): {problem}; widen the space or leave --enqueue-base "
                "out"
            )
        values[param.key] = int(value) if param.kind == "int" else value
    if not values:
        raise SpaceError(
            f"--enqueue-base: --config {source} (and its overrides) sets none of the searched "
            "keys, so its trial would be a sampled one"
        )
    return values


def preset_values(base: dict, overrides: list[tuple[str, Any]], source: str) -> dict[str, Any]:
    """The values (dotted key -> value) that the preset of the base config, after its
    overrides, derives from its prepared data, as ``fit`` would; {} without a preset."""
    config = _with_overrides(base, overrides)
    name = config.get("preset")
    if name is None:
        return {}
    from recforge.data import storage
    from recforge.data.layout import MANIFEST, read_manifest
    from recforge.data.stats import with_statistics
    from recforge.families import UnknownFamilyError
    from recforge.trainer.presets import (
        TABLE_OPTIMIZER,
        PresetError,
        check_preset,
        for_table_optimizer,
    )

    _, class_path = get_dotted(config, "model.class_path")
    _, data_dir = get_dotted(config, "data.data_dir")
    try:
        derive = check_preset(str(name), str(class_path))
    except (PresetError, UnknownFamilyError) as exc:
        raise SpaceError(f"--enqueue-base: --config {source}: {exc}") from None
    if data_dir is None or not storage.exists(storage.join(str(data_dir), MANIFEST)):
        raise SpaceError(
            f"--enqueue-base: the preset {name!r} of --config {source} derives the base's values "
            f"from the prepared data, and {data_dir} holds none (no {MANIFEST}): run `recforge "
            "data prepare` first, or pass --data.data_dir"
        )
    derived = derive(with_statistics(str(data_dir), read_manifest(str(data_dir))))
    found, optimizer = get_dotted(config, TABLE_OPTIMIZER)
    derived, _ = for_table_optimizer(derived, optimizer if found else None)
    return {key: d.value for key, d in derived.items()}


def _with_overrides(base: dict, overrides: list[tuple[str, Any]]) -> dict:
    config = copy.deepcopy(base)
    for key, value in overrides:
        set_dotted(config, key, value)
    return config
