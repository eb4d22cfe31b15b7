"""How much of the process's memory limit the out-of-core prepare engine
(:mod:`recforge.data.prepare_duckdb`) gives DuckDB.

``memory_limit`` (``--memory-limit``) bounds the whole process, and DuckDB's own
``memory_limit`` covers its buffer manager only. What it does not count comes on top: the
interpreter and libraries (~0.1 GB), Arrow and numpy buffers (input batches, the flat rows cut
into lists, Parquet writer buffers, per-user arrays), allocations DuckDB does not track and
what the allocators keep of freed memory; together 0.3-0.6 GB measured from 20M to 300M
interactions. So DuckDB gets three quarters of the limit, at most the limit less 512 MiB, at
least a quarter (4GB: 3GB to DuckDB, 1GB reserved; 1GB: 0.46GB to DuckDB), and spills the rest.
Before the final sort (``prepare_duckdb._write_sequences``) the share shrinks, if need be, to
the limit less what the process holds outside DuckDB by then (the per-user and per-item arrays
grow with the data, ~40 bytes a user) less 256 MiB for the write's own buffers.
A limit under about 1GB leaves too little for that footprint and can be exceeded.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

log = logging.getLogger(__name__)

# Of the process's memory limit, DuckDB's buffer manager gets three quarters, at most the limit
# less this reserve, at least a quarter (see _duckdb_share).
_RESERVE_MIN = 512 << 20
# Kept free for the final write's own Arrow buffers and Parquet writer, over what Python holds
# when it starts (see shrink_share_for_python).
_WRITE_ROOM = 256 << 20


def apply_memory_limit(con: Any, limit: str) -> None:
    """Set DuckDB's share of the process limit ``limit`` (the --memory-limit text) on ``con``,
    and keep the whole limit for :func:`shrink_share_for_python`."""
    import duckdb

    quoted = limit.replace("'", "''")
    try:
        con.execute(f"SET memory_limit = '{quoted}'")
    except duckdb.Error as exc:
        raise ValueError(f"memory_limit (--memory-limit): {limit!r} ({exc})") from None
    read_back = con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
    total = _process_limit(limit, str(read_back))
    if total is not None:
        con.execute(f"SET memory_limit = '{_duckdb_share(total)}B'")
        con.execute(f"SET VARIABLE recforge_process_limit = {total}")


# DuckDB's units: KB, MB, ... are powers of 1000, KiB, MiB, ... powers of 1024.
_UNITS = {"b": 1, "byte": 1, "bytes": 1} | {
    unit: base**power
    for power, prefix in enumerate("kmgtp", 1)
    for base, names in ((1000, (prefix, prefix + "b")), (1024, (prefix + "ib",)))
    for unit in names
}


def size_bytes(text: str) -> int | None:
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*", text.lower())
    if match is None or match[2] not in _UNITS:
        return None
    return int(float(match[1]) * _UNITS[match[2]])


def _process_limit(limit: str, read_back: str) -> int | None:
    """Bytes of the process limit ``limit`` (the --memory-limit text, else ``read_back``,
    DuckDB's rounded reading of it, e.g. of a percentage); None (DuckDB keeps the whole limit)
    when neither parses or the limit is unbounded (``-1``)."""
    total = size_bytes(limit) or size_bytes(read_back)
    return None if total is None or total >= 1 << 60 else total


def _duckdb_share(total: int) -> int:
    """DuckDB's ``memory_limit`` in a process limit of ``total`` bytes: three quarters, at most
    the limit less ``_RESERVE_MIN``, at least a quarter."""
    return max(total // 4, min(total * 3 // 4, total - _RESERVE_MIN))


def shrink_share_for_python(con: Any) -> None:
    """Before the last sort: lower DuckDB's share to the process limit less what the process
    holds outside DuckDB by now (RSS less DuckDB's own count; the per-user and per-item arrays
    grow with the data, ~40 bytes a user) and ``_WRITE_ROOM`` for the write's own buffers.
    Linux only (reads /proc); elsewhere the share stays."""
    import duckdb

    total = con.execute("SELECT getvariable('recforge_process_limit')").fetchall()[0][0]
    if total is None:
        return
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return
    total = int(total)
    held = con.execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()").fetchall()[0][0]
    outside = rss - int(held or 0)
    share = max(total // 4, min(_duckdb_share(total), total - outside - _WRITE_ROOM))
    log.debug("duckdb memory_limit for the final sort: %d bytes (%d outside)", share, outside)
    try:
        con.execute(f"SET memory_limit = '{share}B'")
    except duckdb.Error:  # it could not evict enough right now: keep the share
        log.debug("duckdb memory_limit left as it was", exc_info=True)
