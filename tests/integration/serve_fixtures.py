"""Running the real `recforge` CLI and a real `recforge serve` process for the serving tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests

RECFORGE = str(Path(sys.executable).with_name("recforge"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([RECFORGE, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


@contextmanager
def serving(source: Path, cwd: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """``recforge serve SOURCE`` on a free loopback port: yields (base URL, process); SIGTERM after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([RECFORGE, "serve", str(source), "--port", str(port)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError(proc.stdout.read()[-3000:] if proc.stdout else "server did not start")
    try:
        yield url, proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
