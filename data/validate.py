"""`recforge data validate`: check a prepared directory against data/layout.py, streaming.

Any engine may write a prepared directory (docs/scale.md sketches a Spark job); this is the gate
before training trusts one. ``sequences.parquet`` is read one row group at a time and
``users.parquet`` in step with it (both are in ``user_idx`` order), ``items.parquet`` in
batches, so memory is one row group plus one int64 per item (the counts that ``items.parquet``'s
``count`` must match).

Each problem names the file, the column or manifest field, the first offending row (1-based)
and what was expected. A check that fails on many rows is one problem with the number of
further rows, so one badly broken file does not bury the other findings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from recforge.data import layout, storage
from recforge.data.validate_files import (
    BATCH_ROWS,
    FEATURE_TYPES,
    ID,
    INT32,
    INT64,
    Expect,
    RowBatches,
    SequencesCheck,
    Specs,
    VocabFile,
    col,
    fld,
    list_of,
)

MAX_SHOWN = 20


@dataclass
class Problem:
    file: str
    where: str | None  # "column 'x'", "field 'x'" (manifest) or "key 'x'" (feature_vocabs.json)
    row: int  # the first offending row, 1-based; 0 when the problem is not about a row
    message: str
    more: int = 0  # further rows with the same problem

    def __str__(self) -> str:
        head = ", ".join(p for p in (self.file, self.where, self.row and f"row {self.row}") if p)
        tail = f" (and {self.more} more row{'s' * (self.more != 1)})" if self.more else ""
        return f"{head}: {self.message}{tail}"


@dataclass
class ValidationReport:
    directory: str
    problems: list[Problem] = field(default_factory=list)
    users: int = 0
    items: int = 0
    interactions: int = 0
    row_groups: int = 0  # of sequences.parquet, read

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self, limit: int = MAX_SHOWN) -> list[str]:
        shown = [str(p) for p in self.problems[:limit]]
        if len(self.problems) > limit:
            shown.append(f"... and {len(self.problems) - limit} more")
        return shown

    def summary(self) -> str:
        state = "valid" if self.ok else f"{len(self.problems)} problem(s)"
        return (
            f"{self.directory}: {state}: {self.users} users, {self.items} items, "
            f"{self.interactions} interactions, {self.row_groups} row groups checked"
        )


def validate(directory: str | Path) -> ValidationReport:
    """Check every file of a prepared directory; bad content is reported, never raised."""
    return _Validator(str(directory)).run()


class _Validator:
    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.found: dict[tuple[str, str | None, str], Problem] = {}
        self.counts: dict[str, int | None] = {}
        self.split: dict[str, Any] | None = None
        self.carried: dict[str, int] | None = None

    def add(
        self, file: str, where: str | None, msg: str, row: int = 0, n: int = 1, key: str = ""
    ) -> None:
        """Record a problem; a repeat of one check (same key) only adds to its rows."""
        k = (file, where, key or msg)
        if k in self.found:
            self.found[k].more += n
        else:
            self.found[k] = Problem(file, where, row, msg, n - 1)

    def run(self) -> ValidationReport:
        report = ValidationReport(str(self.dir))
        if storage.is_remote(self.dir):
            try:
                storage.check_reachable(self.dir)
            except storage.StorageError as exc:
                self.add(self.dir, None, exc.message)
        elif not Path(self.dir).is_dir():
            self.add(self.dir, None, "not a directory")
        manifest = None if self.found else self._json(layout.MANIFEST, "not a prepared directory")
        if manifest is not None:
            report.row_groups = self._check(manifest)
            report.users, report.items, report.interactions = (
                self.counts[k] or 0 for k in ("users", "items", "interactions")
            )
        report.problems = list(self.found.values())
        return report

    def _json(self, name: str, if_missing: str) -> dict[str, Any] | None:
        try:
            value = json.loads(storage.read_bytes(storage.join(self.dir, name)))
        except FileNotFoundError:
            self.add(name, None, f"missing; {if_missing}")
            return None
        except (ValueError, OSError) as exc:
            self.add(name, None, f"not readable JSON ({exc})")
            return None
        if not isinstance(value, dict):
            self.add(name, None, "expected a JSON object")
            return None
        return value

    # --- manifest.json and feature_vocabs.json ---

    def _manifest(self, m: dict[str, Any]) -> None:
        if m.get("format_version") != layout.FORMAT_VERSION:
            msg = f"{m.get('format_version')!r}, expected {layout.FORMAT_VERSION}"
            self.add(layout.MANIFEST, fld("format_version"), msg)
        for name in ("users", "items", "interactions", "sequences_row_group_size"):
            value = m.get(name)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            self.counts[name] = value if ok else None
            if not ok:
                self.add(layout.MANIFEST, fld(name), f"{value!r}; expected an integer >= 1")
        if "vocab_from" in m:
            self._vocab_from(m["vocab_from"])
        if m.get("has_rating") not in (True, False):
            msg = f"{m.get('has_rating')!r}; expected true or false"
            self.add(layout.MANIFEST, fld("has_rating"), msg)
        split = m.get("split")
        kind = split.get("type") if isinstance(split, dict) else None
        if kind not in ("leave-one-out", "time"):
            msg = f"{split!r}; expected type 'leave-one-out' or 'time'"
            self.add(layout.MANIFEST, fld("split"), msg)
            return
        if kind == "time":
            val, test = split.get("val_start"), split.get("test_start")
            if not all(isinstance(b, int) and not isinstance(b, bool) for b in (val, test)):
                msg = f"val_start {val!r}, test_start {test!r}; expected integer timestamps"
                self.add(layout.MANIFEST, fld("split"), msg)
                return
            if val >= test:
                # Split counts under impossible cut points would only add noise: not computed.
                msg = f"val_start {val} >= test_start {test}; expected val_start < test_start"
                self.add(layout.MANIFEST, fld("split"), msg)
                return
        self.split = split

    def _vocab_from(self, entry: Any) -> None:
        """``--vocab-from`` keeps a previous vocabulary: its ids (idx 1..known per side) keep
        that order, may have count 0, and such users have no sequence."""
        self.carried = {"user": 0, "item": 0}
        for side in self.carried:
            name = f"{side}s_known"
            value = entry.get(name) if isinstance(entry, dict) else None
            top = self.counts[f"{side}s"]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                msg = f"{value!r}; expected an integer >= 0 (ids carried over)"
                self.add(layout.MANIFEST, fld(f"vocab_from.{name}"), msg)
            elif top is not None and value > top:
                msg = f"{value}, more than the {top} {side}s of the vocabulary"
                self.add(layout.MANIFEST, fld(f"vocab_from.{name}"), msg)
            else:
                self.carried[side] = value

    def _features(self, m: dict[str, Any]) -> dict[str, Specs]:
        """Per side, the manifest's feature specs that can be checked against the files."""
        if_missing = 'expected the code values per side ({"item": {}, "user": {}} if none)'
        vocabs = self._json(layout.FEATURE_VOCABS, if_missing)
        feats = m.get("features", {})
        usable: dict[str, Specs] = {"item": {}, "user": {}}
        for side in usable:
            specs = feats.get(side, {}) if isinstance(feats, dict) else None
            if not isinstance(specs, dict):
                self.add(layout.MANIFEST, fld(f"features.{side}"), f"{specs!r}; expected {{}}")
                continue
            side_vocabs = vocabs.get(side, {}) if vocabs is not None else None
            if side_vocabs is not None and not isinstance(side_vocabs, dict):
                self.add(layout.FEATURE_VOCABS, f"key '{side}'", "expected an object")
                side_vocabs = None
            for name, spec in specs.items():
                ok = isinstance(spec, dict) and spec.get("kind") in FEATURE_TYPES
                if not ok or not isinstance(spec.get("cardinality"), int):
                    msg = f"{spec!r}; expected a kind (categorical, list, numeric), a cardinality"
                    self.add(layout.MANIFEST, fld(f"features.{side}.{name}"), msg)
                    continue
                usable[side][name] = spec
                if spec["kind"] != "numeric" and side_vocabs is not None:
                    self._vocab(side, name, side_vocabs.get(name), spec["cardinality"])
            for name in side_vocabs or {}:
                if usable[side].get(name, {}).get("kind") not in ("categorical", "list"):
                    msg = f"no categorical or list feature {name!r} in manifest 'features.{side}'"
                    self.add(layout.FEATURE_VOCABS, f"key '{side}.{name}'", msg)
        return usable

    def _vocab(self, side: str, name: str, values: Any, card: int) -> None:
        where = f"key '{side}.{name}'"
        if not isinstance(values, list) or len(values) != card - 1:
            got = f"{len(values)} values" if isinstance(values, list) else repr(values)
            msg = f"{got}; expected {card - 1} (manifest cardinality {card}, less code 0)"
            self.add(layout.FEATURE_VOCABS, where, msg)
        elif len({json.dumps(v) for v in values}) != len(values):
            self.add(layout.FEATURE_VOCABS, where, "a value repeats; one value per code")

    # --- Parquet files ---

    def _open(self, name: str, expected: dict[str, Expect], optional: set[str]) -> Any:
        """``(file, columns with the expected type)``, reporting the rest; None if unreadable."""
        try:
            pf = storage.parquet_file(storage.join(self.dir, name))
        except FileNotFoundError:
            self.add(name, None, "missing; data/layout.py requires it")
            return None
        except (pa.ArrowException, OSError) as exc:
            self.add(name, None, f"cannot read Parquet ({str(exc).splitlines()[0][:200]})")
            return None
        schema, good = pf.schema_arrow, set()
        for column, (desc, ok) in expected.items():
            if column not in schema.names:
                if column not in optional:
                    self.add(name, col(column), f"missing; expected a {desc} column")
            elif not ok(schema.field(column).type):
                self.add(
                    name, col(column), f"has type {schema.field(column).type}; expected {desc}"
                )
            else:
                good.add(column)
        for column in schema.names:
            if column not in expected:
                where = "" if name == layout.SEQUENCES else " nor among the manifest's features"
                self.add(name, col(column), f"not in data/layout.py{where}")
        return pf, good

    def _vocab_file(self, side: str, specs: Specs) -> tuple[RowBatches, VocabFile] | None:
        name = layout.ITEMS if side == "item" else layout.USERS
        expected = {f"{side}_idx": INT32, f"{side}_id": ID, "count": INT64}
        expected.update({k: FEATURE_TYPES[s["kind"]] for k, s in specs.items()})
        opened = self._open(name, expected, set())
        if opened is None:
            return None
        checker = VocabFile(self, side, opened[1], specs)
        return RowBatches(self, name, opened[0], checker.columns()), checker

    # --- the whole directory ---

    def _check(self, m: dict[str, Any]) -> int:
        """All checks; returns the number of row groups of sequences.parquet read."""
        self._manifest(m)
        specs = self._features(m)
        users = self._vocab_file("user", specs["user"])
        items = self._vocab_file("item", specs["item"])
        expected = {
            "user_idx": INT32,
            "length": INT32,
            "item_idx": list_of(pa.int32()),
            "timestamp": list_of(pa.int64()),
            "rating": list_of(pa.float32()),
        }
        # Timestamps are needed only to cut a time split; leave-one-out reads lengths alone.
        timed = self.split is not None and self.split["type"] == "time"
        optional = {"rating"} if timed else {"rating", "timestamp"}
        if m.get("has_rating") is False:
            expected.pop("rating")
        elif m.get("has_rating") is True:
            optional.discard("rating")
        opened, read, item_counts = self._open(layout.SEQUENCES, expected, optional), 0, None
        if opened is not None:
            pf, good = opened
            seqs = SequencesCheck(self, good)
            try:
                for rg in range(pf.num_row_groups):
                    group = pf.read_row_group(rg, columns=sorted(good))
                    lengths = seqs.check(group)
                    read += 1
                    if users and seqs.sparse and "user_idx" in good and lengths is not None:
                        self._sparse_users(users, seqs.group_users, lengths)
                        continue
                    chunk = users[0].take(pf.metadata.row_group(rg).num_rows) if users else None
                    if users and chunk is not None:
                        users[1].check(chunk, None if lengths is None else lengths[: len(chunk)])
            except (pa.ArrowException, OSError) as exc:
                msg = f"cannot read row group {read} ({str(exc).splitlines()[0][:200]})"
                self.add(layout.SEQUENCES, None, msg)
            else:  # totals of a file read only in part would only add noise
                item_counts = seqs.item_counts if seqs.n_items and "item_idx" in good else None
                self._compare(m, seqs)
        for opened_vocab in (users, items):
            if opened_vocab is None:
                continue
            rows, checker = opened_vocab
            while (chunk := rows.take(BATCH_ROWS)) is not None:
                counts = None  # users past the sequences have no lengths to match
                if checker.side == "user" and self.carried is not None and item_counts is not None:
                    counts = np.zeros(len(chunk), np.int64)  # ... but none, sparsely
                if checker.side == "item" and item_counts is not None:
                    counts = np.zeros(len(chunk), np.int64)
                    have = item_counts[checker.rows + 1 : checker.rows + 1 + len(chunk)]
                    counts[: len(have)] = have
                checker.check(chunk, counts)
            checker.finish()
        return read

    def _sparse_users(
        self, users: tuple[RowBatches, VocabFile], user: np.ndarray, lengths: np.ndarray
    ) -> None:
        """Check users.parquet up to a row group's last user; users between rows have none."""
        rows, checker = users
        first = checker.rows
        chunk = rows.take(int(user.max()) - first) if len(user) and user.max() > first else None
        if chunk is None:
            return
        counts = np.zeros(len(chunk), np.int64)
        here = (user > first) & (user <= first + len(chunk))
        counts[user[here] - first - 1] = lengths[here]
        checker.check(chunk, counts)

    def _compare(self, m: dict[str, Any], seqs: SequencesCheck) -> None:
        """The manifest's counts against what the sequences hold."""
        users, interactions = self.counts["users"], self.counts["interactions"]
        if users is not None and seqs.rows != users and not seqs.sparse:
            msg = f"{users}, but sequences.parquet holds {seqs.rows} rows (one per user)"
            self.add(layout.MANIFEST, fld("users"), msg)
        if seqs.lengths_ok and interactions is not None and seqs.interactions != interactions:
            msg = f"{interactions}, but sequences.parquet holds {seqs.interactions} interactions"
            self.add(layout.MANIFEST, fld("interactions"), msg)
        recorded = m.get("split_counts")
        if seqs.split_ok and isinstance(recorded, dict):
            for name, value in seqs.split_counts.items():
                if name in recorded and recorded[name] != value:
                    msg = f"{recorded[name]!r}, but the sequences give {value} under the split"
                    self.add(layout.MANIFEST, fld(f"split_counts.{name}"), msg)
