"""Running the real `recforge` CLI and a real `recforge serve` process for the serving tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from recforge.serve.local import free_port, wait_healthy

RECFORGE = str(Path(sys.executable).with_name("recforge"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RECFORGE, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )


@contextmanager
def serving(source: Path, cwd: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """``recforge serve SOURCE`` on a free loopback port: yields (base URL, process); SIGTERM
    after."""
    port = free_port()
    proc = subprocess.Popen(
        [RECFORGE, "serve", str(source), "--port", str(port)],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url + "/healthz", timeout_s=60, proc=proc)
    except RuntimeError as exc:
        proc.kill()
        raise RuntimeError(f"{exc}: {proc.stdout.read()[-3000:] if proc.stdout else ''}") from None
    try:
        yield url, proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
