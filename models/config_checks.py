"""Validation of the models' dataclass configs, with errors that name the offending field.

Configs arrive from YAML files and the command line, where a typo becomes a string or a float
in an integer field; the message ``SASRecConfig.dim=0: must be >= 1`` points at the line to fix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


class FieldChecks:
    """Checks of one config instance; every failure raises
    ``ValueError("<Class>.<field>=<value>: ...")``."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def need(self, ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ValueError(
                f"{type(self.config).__name__}.{name}={getattr(self.config, name)!r}: {what}"
            )

    def integers(self, *names: str) -> None:
        for name in names:
            self.need(is_int(getattr(self.config, name)), name, "must be an integer")

    def booleans(self, *names: str) -> None:
        for name in names:
            self.need(isinstance(getattr(self.config, name), bool), name, "must be true or false")

    def finite_numbers(self, *names: str) -> None:
        for name in names:
            value = getattr(self.config, name)
            self.need(
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value),
                name,
                "must be a finite number",
            )

    def feature_cardinalities(self, *names: str) -> None:
        """Each named field maps identifier feature names to table sizes >= 1."""
        for name in names:
            cards = getattr(self.config, name)
            self.need(
                isinstance(cards, Mapping)
                and all(
                    isinstance(k, str) and k.isidentifier() and is_int(v) and v >= 1
                    for k, v in cards.items()
                ),
                name,
                "must map identifier feature names to table sizes >= 1",
            )


def is_int(value: Any) -> bool:
    """An int that is not a bool (``True`` is an ``int`` to Python, not to a config)."""
    return isinstance(value, int) and not isinstance(value, bool)
