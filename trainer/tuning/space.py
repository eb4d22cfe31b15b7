"""The search-space file of ``recforge tune --space``.

A YAML mapping from dotted config keys, spelled as ``recforge fit`` takes them on the command
line, to a distribution::

    model.init_args.optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    model.init_args.model.num_layers: {type: int, low: 1, high: 3}            # step: 1
    model.init_args.model.dropout: {type: float, low: 0.0, high: 0.5, step: 0.1}
    model.init_args.model.loss: {type: categorical, choices: [ce, bce]}

``float`` takes ``low``, ``high`` and either ``log: true`` or ``step``; ``int`` takes ``low``,
``high`` and ``step`` or ``log``; ``categorical`` takes ``choices`` (numbers, strings, booleans
or null). Any other key, a missing bound or ``low > high`` is a :class:`SpaceError` naming the
entry, raised before any trial runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

_FIELDS = {
    "float": ({"type", "low", "high"}, {"log", "step"}),
    "int": ({"type", "low", "high"}, {"log", "step"}),
    "categorical": ({"type", "choices"}, set()),
}


class SpaceError(ValueError):
    """A search-space file or entry that cannot be used."""


@dataclass(frozen=True)
class Param:
    """One searched config key and its distribution."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "float":
            value = trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
            return self.tidy(value)
        if self.kind == "int":
            return trial.suggest_int(
                self.key, self.low, self.high, log=self.log, step=self.step or 1
            )
        return trial.suggest_categorical(self.key, list(self.choices))

    def tidy(self, value: Any) -> Any:
        """A float on a ``step`` grid as written, without the binary noise of Optuna's
        ``low + k * step`` (0.1 + 2 * 0.1 is 0.30000000000000004), so the fit arguments, the
        MLflow parameters and best_config.yaml read 0.3."""
        if self.kind != "float" or self.step is None:
            return value
        return tidy_float(value, self.low, self.step)

    def rejects(self, value: Any) -> str | None:
        """Why ``value`` cannot be a trial's value of this parameter, or None."""
        if self.kind == "categorical":
            return None if value in self.choices else f"not one of {list(self.choices)}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"not a number (a {self.kind} parameter)"
        if self.kind == "int" and not float(value).is_integer():
            return "not an integer (an int parameter)"
        assert self.low is not None and self.high is not None
        if not self.low <= value <= self.high:
            return f"outside [{self.low}, {self.high}]"
        if self.step is not None:
            steps = (value - self.low) / self.step
            if abs(steps - round(steps)) > 1e-8:
                return f"not on the grid {self.low} + k * {self.step}"
        return None


def load_yaml(text: str) -> Any:
    """YAML as ``recforge fit`` reads it (jsonargparse's loader), for the space file, the base
    config and the overrides alike: ``1e-3`` is a number there, and a string to PyYAML's YAML
    1.1, so a base value or a bound written that way would otherwise differ from what fit runs."""
    from jsonargparse import get_loader

    return get_loader("yaml")(text)


class _Dumper(yaml.SafeDumper):
    """Writes YAML that :func:`load_yaml` reads back as written."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # A string that fit would read as something else when written plain (``'1e-3'``) is quoted;
    # PyYAML's own rules miss it, as to YAML 1.1 it is no number.
    try:
        plain = load_yaml(value) == value
    except yaml.YAMLError:
        plain = False
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=None if plain else "'")


_Dumper.add_representer(str, _represent_str)


def dump_yaml(data: Any) -> str:
    """``data`` as YAML that ``recforge fit`` reads back as ``data`` (keys in their order)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def load_space(path: str | Path) -> list[Param]:
    """The parameters of a search-space file, checked (module docstring)."""
    try:
        raw = load_yaml(Path(path).read_text())
    except OSError as exc:
        raise SpaceError(f"--space {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SpaceError(f"--space {path}: not valid YAML ({exc})") from None
    if not isinstance(raw, Mapping) or not raw:
        raise SpaceError(
            f"--space {path}: expected a mapping of dotted config keys to distributions, e.g. "
            "'model.init_args.optimizer.lr: {type: float, low: 1e-4, high: 1e-2, log: true}'"
        )
    return [parse_param(str(key), spec, path) for key, spec in raw.items()]


def parse_param(key: str, spec: Any, source: str | Path = "space") -> Param:
    where = f"--space {source}: {key}"
    if not key or any(not part for part in key.split(".")):
        raise SpaceError(f"{where}: not a dotted config key (e.g. model.init_args.optimizer.lr)")
    if not isinstance(spec, Mapping):
        raise SpaceError(f"{where}: expected a mapping with 'type', got {spec!r}")
    kind = spec.get("type")
    if kind not in _FIELDS:
        raise SpaceError(f"{where}: type {kind!r}; expected float, int or categorical")
    required, optional = _FIELDS[kind]
    missing = sorted(required - set(spec))
    unknown = sorted(set(spec) - required - optional)
    if missing or unknown:
        parts = [f"missing {', '.join(missing)}"] if missing else []
        parts += [f"unknown field(s) {', '.join(unknown)}"] if unknown else []
        raise SpaceError(f"{where}: {'; '.join(parts)} (a {kind} takes {_takes(kind)})")
    if kind == "categorical":
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: choices must be a non-empty list")
        bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float, str))]
        if bad:
            # Optuna stores choices as JSON scalars; a list or mapping cannot be a choice.
            raise SpaceError(f"{where}: choices must be numbers, strings, booleans or null: {bad}")
        return Param(key, kind, choices=tuple(choices))
    number = float if kind == "float" else int
    low, high, step = spec["low"], spec["high"], spec.get("step")
    log = spec.get("log", False)
    for name, value in (("low", low), ("high", high), ("step", step)):
        if value is None and name == "step":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpaceError(f"{where}: {name} must be a number, got {value!r}")
        if number is int and not float(value).is_integer():
            raise SpaceError(f"{where}: {name} must be an integer for an int, got {value!r}")
    if not isinstance(log, bool):
        raise SpaceError(f"{where}: log must be true or false, got {log!r}")
    if low > high:
        raise SpaceError(f"{where}: low ({low}) is above high ({high})")
    if log and low <= 0:
        raise SpaceError(f"{where}: log: true needs low > 0, got {low}")
    if log and step is not None:
        raise SpaceError(f"{where}: log and step cannot be combined (Optuna samples one or other)")
    if step is not None and step <= 0:
        raise SpaceError(f"{where}: step must be > 0, got {step}")
    return Param(
        key,
        kind,
        low=number(low),
        high=number(high),
        log=log,
        step=None if step is None else number(step),
    )


def tidy_float(value: Any, low: float, step: float) -> Any:
    """``value``, a float on the grid ``low + k * step``, rounded to the decimals the grid is
    written with (see :meth:`Param.tidy`); anything else as it is."""
    if not isinstance(value, float):
        return value
    return round(value, max(_decimals(low), _decimals(step)))


def _decimals(number: Any) -> int:
    """Decimal places of ``number`` as written (``repr``): 0.05 -> 2, 1e-05 -> 5, 3.0 -> 0."""
    exponent = Decimal(repr(float(number))).normalize().as_tuple().exponent
    return max(0, -int(exponent))


def _takes(kind: str) -> str:
    required, optional = _FIELDS[kind]
    fields = sorted(required - {"type"}) + [f"optional {f}" for f in sorted(optional)]
    return ", ".join(fields)


def cli_value(value: Any) -> str:
    """A sampled value as a ``recforge fit`` argument: YAML, so that null, true and numbers keep
    their type when the CLI parses them."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def dotted_pairs(fit_args: list[str]) -> list[tuple[str, Any]]:
    """``--a.b VALUE`` / ``--a.b=VALUE`` pairs of the pass-through arguments, values as YAML."""
    pairs, i = [], 0
    while i < len(fit_args):
        arg = fit_args[i]
        if arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif arg.startswith("--") and i + 1 < len(fit_args):
            key, value = arg[2:], fit_args[i + 1]
            i += 1
        else:
            i += 1
            continue
        i += 1
        try:
            pairs.append((key, load_yaml(value)))
        except yaml.YAMLError:
            pairs.append((key, value))
    return pairs


def get_dotted(config: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    """``(True, value)`` at dotted ``key`` of ``config``, ``(False, None)`` where it is not set."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """``config`` with ``a.b.c`` set to ``value``, making the mappings on the way."""
    node = config
    *parents, last = key.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value
