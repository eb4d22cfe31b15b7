"""A trial subprocess that does not outlive its tuner (Linux): a killed tuner leaves no orphan
``recforge fit`` reporting into the study."""

from __future__ import annotations

import sys
from typing import Any


def _libc_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Resolved here, before any fork: the child between fork and exec should only make the call.
_PRCTL = _libc_prctl()


def die_with_parent() -> None:
    """Linux: the trial gets SIGTERM when the tuner dies, so a killed tuner leaves no orphan fit
    reporting into the study (elsewhere the trial runs to its end). The signal follows the
    *thread* that started the trial; that thread waits for the trial, so it outlives it."""
    if _PRCTL is not None:
        import signal

        _PRCTL(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
