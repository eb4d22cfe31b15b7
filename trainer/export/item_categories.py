"""The artifact's ``items.parquet``: ids and counts, plus each categorical/list item feature as its
original values (docs/architecture.md §9), so the server can honour ``exclude_categories``.

The prepared ``items.parquet`` holds feature *codes* and ``feature_vocabs.json`` their values;
the server must not read prepared data (it only has the artifact), so the export decodes the
codes here. Every feature becomes a ``list<string>`` column (a categorical one holds zero or one
value): one representation for both kinds, and strings because a request's JSON value (``1995``
or ``"1995"``) is compared as text. Numeric features are not categories and stay out.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from recforge.data import storage
from recforge.data.layout import FEATURE_VOCABS, ITEMS, read_manifest

BASE_COLUMNS = ["item_idx", "item_id", "count"]


def item_table(data_dir: str) -> pa.Table:
    """``item_idx``, ``item_id``, ``count`` and one ``list<string>`` column per categorical or
    list item feature of the prepared directory, sorted by ``item_idx``."""
    features: dict[str, Any] = (read_manifest(data_dir).get("features") or {}).get("item") or {}
    names = [n for n, spec in features.items() if spec.get("kind") in ("categorical", "list")]
    names = [n for n in names if n not in BASE_COLUMNS]
    items = storage.read_table(storage.join(data_dir, ITEMS), columns=BASE_COLUMNS + names)
    items = items.sort_by("item_idx")
    if not names:
        return items
    vocabs = json.loads(storage.read_text(storage.join(data_dir, FEATURE_VOCABS))).get("item", {})
    columns = {c: items[c] for c in BASE_COLUMNS}
    for name in names:
        values = [str(v) for v in vocabs.get(name, [])]  # code c (>= 1) is values[c - 1]

        def decode(code: int | None, values: list[str] = values) -> list[str]:
            return [values[code - 1]] if code and 0 < code <= len(values) else []

        if features[name]["kind"] == "list":
            rows = [
                [v for c in codes or () for v in decode(c)] for codes in items[name].to_pylist()
            ]
        else:
            rows = [decode(code) for code in items[name].to_pylist()]
        columns[name] = pa.array(rows, type=pa.list_(pa.string()))
    return pa.table(columns)
