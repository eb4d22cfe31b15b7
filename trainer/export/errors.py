"""The error every export step raises when it cannot produce a faithful artifact."""

from __future__ import annotations


class ExportError(RuntimeError):
    """Export cannot produce a faithful artifact (unknown model, failed parity, bad input)."""
