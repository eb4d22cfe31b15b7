"""Time and peak memory of `recforge data prepare`, per engine, on synthetic interactions.

    python benchmarks/prepare.py --sizes 1000000 5000000 20000000 --engines memory duckdb
    python benchmarks/prepare.py --sizes 100000000 --engines duckdb --timeout 360
    python benchmarks/prepare.py --input /path/interactions.parquet  # an existing file
    python benchmarks/prepare.py --sizes 20000000 100000000 --engines duckdb \
        --workdir /tmp/rfbench --json /tmp/prepare.json   # keep inputs; results as JSON too

Inputs come from `recforge data synth --interactions N` (mean length 100, N / 400 items) and
are kept in ``--workdir`` when one is given, so a rerun skips generating them. Each prepare
runs as its own child process, and its peak RSS is that child's alone (``os.wait4``), in GB of
10^9 bytes as DuckDB reads ``--memory-limit 4GB``; ``<= limit`` compares the two. The DuckDB
engine spills into ``<workdir>/spill``: ``spill GB`` is the largest size that folder reached
(its database file, holding the loaded rows, plus DuckDB's temporary files), polled every
0.5 s. Prints a Markdown table (and the load average, as the machine may be shared);
``--json`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECFORGE = [sys.executable, "-m", "recforge.cli"]


def synth(work: Path, n: int) -> tuple[str, float]:
    out = work / f"synth-{n}"
    src = out / "interactions.parquet"
    if src.is_file():
        return str(src), 0.0
    t0 = time.perf_counter()
    subprocess.run(
        [
            *RECFORGE,
            "data",
            "synth",
            "--interactions",
            str(n),
            "--mean-length",
            "100",
            "--items",
            str(max(1000, n // 400)),
            "--out",
            str(out),
            "--overwrite",
        ],
        check=True,
        capture_output=True,
    )
    return str(src), time.perf_counter() - t0


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:  # removed meanwhile
                pass
    return total


def run_prepare(
    cmd: list[str], timeout: float, spill: Path | None = None
) -> tuple[int, float, float, str, int]:
    """(exit status, seconds, peak RSS in GB, stderr tail, peak bytes under spill) of one child;
    killed at timeout."""
    t0 = time.perf_counter()
    spill_peak, polled = 0, 0.0
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        while True:
            if spill is not None and time.perf_counter() - polled >= 0.5:
                polled = time.perf_counter()
                spill_peak = max(spill_peak, folder_bytes(spill))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                proc.send_signal(signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.perf_counter() - t0
        err.seek(0)
        tail = err.read()[-2000:]
    return proc.returncode, elapsed, usage.ru_maxrss * 1024 / 1e9, tail, spill_peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[20_000_000], help="synthetic set sizes"
    )
    parser.add_argument(
        "--interactions", type=int, default=None, help="one size (same as --sizes N)"
    )
    parser.add_argument("--input", default=None, help="existing interactions Parquet (no synth)")
    parser.add_argument(
        "--engines", nargs="+", default=["memory", "duckdb"], choices=["memory", "duckdb"]
    )
    parser.add_argument("--memory-limit", default="4GB", help="the duckdb engine's limit")
    parser.add_argument(
        "--workdir", default=None, help="where to write (default: a temp dir, removed after)"
    )
    parser.add_argument("--min-user", type=int, default=5)
    parser.add_argument("--min-item", type=int, default=5)
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds before a prepare run is killed"
    )
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep each prepared output (<workdir>/prepared-<engine>-<rows>), e.g. for the loader",
    )
    args = parser.parse_args()
    if args.interactions is not None:
        args.sizes = [args.interactions]

    work = Path(args.workdir or tempfile.mkdtemp(prefix="recforge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    from recforge.data.duckdb_memory import size_bytes

    limit_bytes = size_bytes(args.memory_limit)
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()}")
    print(
        "| rows | engine | limit | seconds | peak RSS GB | <= limit | spill GB | M rows/s "
        "| kept | users | items | load avg |"
    )
    print("|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    results: list[dict] = []
    try:
        for n in [None] if args.input else args.sizes:
            src, synth_s = (args.input, 0.0) if args.input else synth(work, n)
            if synth_s:
                print(f"<!-- synth {n}: {synth_s:.1f}s -->", flush=True)
            for engine in args.engines:
                out = work / (f"prepared-{engine}-{n}" if args.keep else f"prepared-{engine}")
                cmd = [
                    *RECFORGE,
                    "data",
                    "prepare",
                    "--input",
                    src,
                    "--format",
                    "parquet",
                    "--out",
                    str(out),
                    "--overwrite",
                    "--min-user",
                    str(args.min_user),
                    "--min-item",
                    str(args.min_item),
                    "--engine",
                    engine,
                    "--memory-limit",
                    args.memory_limit,
                ]
                spill = None
                if engine == "duckdb":
                    spill = work / "spill"
                    cmd += ["--spill-dir", str(spill)]
                rc, sec, peak_gb, tail, spill_bytes = run_prepare(cmd, args.timeout, spill)
                limit = args.memory_limit if engine == "duckdb" else "-"
                within = "-"
                if engine == "duckdb" and limit_bytes:
                    within = "yes" if peak_gb * 1e9 <= limit_bytes else "NO"
                row = {
                    "rows": n,
                    "engine": engine,
                    "memory_limit": limit,
                    "seconds": round(sec, 1),
                    "peak_rss_gb": round(peak_gb, 3),
                    "within_limit": within,
                    "spill_gb": round(spill_bytes / 1e9, 3),
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                    "exit": rc,
                }
                results.append(row)
                if rc != 0:
                    why = "timeout" if sec > args.timeout else f"exit {rc}"
                    print(
                        f"| {n} | {engine} | {limit} | {why} after {sec:.0f} | {peak_gb:.2f} | "
                        f"{within} | {row['spill_gb']:.2f} | | | | | {row['load_avg_1m']} |"
                    )
                    print("\n".join(tail.strip().splitlines()[-4:]), file=sys.stderr)
                else:
                    m = json.loads((out / "manifest.json").read_text())
                    row.update(
                        rows=m["input_rows"],
                        kept=m["interactions"],
                        users=m["users"],
                        items=m["items"],
                    )
                    print(
                        f"| {m['input_rows']} | {engine} | {limit} | {sec:.1f} | {peak_gb:.2f} | "
                        f"{within} | {row['spill_gb']:.2f} | "
                        f"{m['input_rows'] / sec / 1e6:.2f} | {m['interactions']} | "
                        f"{m['users']} | {m['items']} | {row['load_avg_1m']} |",
                        flush=True,
                    )
                    if not args.keep:
                        shutil.rmtree(out, ignore_errors=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
