"""Raw user features of a request -> the two-tower user tower's inputs (cold-start users).

A two-tower artifact whose user tower reads user features carries ``user_features.json``: per
categorical or list feature the values of codes 1..K (code 0 = missing, as in
``recforge data prepare``), and the numeric feature names. A request may then send
``user_features: {"country": "DE", "tags": ["a", "b"], "age": 31}`` for a user the model never
saw (or to override a known user's stored values). Unknown values get code 0 (categorical) or
are left out (list) and are reported; unknown feature names are refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recforge.artifact import USER_FEATURES


class UserFeatureError(ValueError):
    """A request's ``user_features`` cannot be used as given."""


def _key(value: Any) -> str:
    # Vocabularies hold strings or numbers (JSON); requests may send either spelling.
    return str(value)


class UserFeatures:
    """Maps raw feature values to the codes and numbers the ONNX user tower takes."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.kinds: dict[str, str] = {}
        self.codes: dict[str, dict[str, int]] = {}
        for kind in ("categorical", "list"):
            for name, values in (spec.get(kind) or {}).items():
                self.kinds[name] = kind
                self.codes[name] = {_key(v): code for code, v in enumerate(values, start=1)}
        self.numeric: list[str] = list(spec.get("numeric") or [])

    @classmethod
    def load(cls, directory: Path) -> UserFeatures:
        return cls(json.loads((directory / USER_FEATURES).read_text()))

    @property
    def names(self) -> list[str]:
        return sorted([*self.kinds, *self.numeric])

    def apply(self, raw: Mapping[str, Any], values: dict[str, Any]) -> list[str]:
        """Write the encoded ``raw`` features into ``values`` (input name -> value, already holding
        the user's stored or missing values); returns the unknown values as ``name=value``."""
        if not isinstance(raw, Mapping):
            raise UserFeatureError("user_features must be an object of feature name -> value")
        unknown: list[str] = []
        for name, value in raw.items():
            if name in self.kinds:
                codes = self.codes[name]
                if self.kinds[name] == "categorical":
                    if isinstance(value, (list, dict)) or value is None:
                        raise UserFeatureError(
                            f"user_features.{name}: expected one value, got {value!r}"
                        )
                    code = codes.get(_key(value), 0)
                    if code == 0:
                        unknown.append(f"{name}={value!r}")
                    values[f"user_{name}"] = [code]
                else:
                    if not isinstance(value, list) or any(
                        isinstance(v, (list, dict)) or v is None for v in value
                    ):
                        raise UserFeatureError(
                            f"user_features.{name}: expected a list of values, got {value!r}"
                        )
                    unknown += [f"{name}={v!r}" for v in value if _key(v) not in codes]
                    values[f"user_{name}"] = [codes[_key(v)] for v in value if _key(v) in codes]
            elif name in self.numeric:
                if (
                    isinstance(value, bool)
                    or not isinstance(value, (int, float))
                    or not math.isfinite(float(value) if abs(value) < 1e308 else math.inf)
                ):
                    raise UserFeatureError(
                        f"user_features.{name}: expected a finite number, got {value!r}"
                    )
                dense = list(values["user_dense"])
                dense[self.numeric.index(name)] = float(value)
                values["user_dense"] = dense
            else:
                raise UserFeatureError(
                    f"user_features: unknown feature {name!r}; this model reads {self.names}"
                )
        return unknown
