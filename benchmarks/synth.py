"""Time and peak memory of `recforge data synth --interactions N` at several sizes.

    python benchmarks/synth.py                                   # 1M, 10M, 30M, 100M, 300M
    python benchmarks/synth.py --sizes 1e6 1e7 --block-rows 4000000 --workdir /tmp/x

Each size runs the real command in its own child process, and that child's peak RSS is read
from its own rusage (os.wait4): RUSAGE_CHILDREN would report the largest child so far, not
this one. Past the first block, peak RSS should stay flat and time grow linearly in N. A size
whose time, projected linearly from the largest one measured, exceeds --max-seconds is skipped.
Each output directory is deleted once measured. Wall time depends on what else the machine is
running; CPU seconds (user + system) are the steadier figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq


def _measure(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (GiB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.read().decode()}")
    proc.stderr.close()
    # ru_maxrss is in KiB on Linux.
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=float,
        default=[1e6, 1e7, 3e7, 1e8, 3e8],
        help="interaction counts, smallest first",
    )
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--block-rows", type=int, default=None, help="default: synth's own")
    parser.add_argument("--max-seconds", type=float, default=360.0)
    parser.add_argument(
        "--workdir", default=None, help="where to write (default: a temp dir, removed after)"
    )
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="recforge-synth-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"items={args.items} block_rows={args.block_rows or 'default'} cpus={os.cpu_count()}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    header = (
        "interactions",
        "row groups",
        "wall s",
        "cpu s",
        "peak RSS GiB",
        "M rows/s",
        "file MiB",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    seconds_per_row = None
    try:
        for n in sorted(int(s) for s in args.sizes):
            if seconds_per_row is not None and n * seconds_per_row > args.max_seconds:
                print(f"| {n:,} | skipped: ~{n * seconds_per_row:.0f} s projected | | | | | |")
                continue
            out = work / f"synth-{n}"
            cmd = [
                sys.executable,
                "-m",
                "recforge.cli",
                "data",
                "synth",
                "--out",
                str(out),
                "--interactions",
                str(n),
                "--items",
                str(args.items),
                "--overwrite",
            ]
            if args.block_rows is not None:
                cmd += ["--block-rows", str(args.block_rows)]
            wall, cpu, peak = _measure(cmd)
            meta = pq.read_metadata(out / "interactions.parquet")
            size = (out / "interactions.parquet").stat().st_size / 1024**2
            shutil.rmtree(out)
            seconds_per_row = wall / n
            row = (
                f"{meta.num_rows:,}",
                str(meta.num_row_groups),
                f"{wall:.1f}",
                f"{cpu:.1f}",
                f"{peak:.2f}",
                f"{meta.num_rows / wall / 1e6:.2f}",
                f"{size:.0f}",
            )
            print("| " + " | ".join(row) + " |", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
