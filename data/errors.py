"""The one exception type for bad input data; the CLI turns it into a one-line message."""

from __future__ import annotations


class DataError(Exception):
    """Input that cannot be prepared. Names the file, and where known the column and row."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        column: str | None = None,
        row: int | None = None,
    ) -> None:
        self.path = path
        self.column = column
        self.row = row
        where = []
        if path is not None:
            where.append(str(path))
        if column is not None:
            where.append(f"column '{column}'")
        if row is not None:
            where.append(f"row {row}")
        self.message = message
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")
