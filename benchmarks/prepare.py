"""Time and peak memory of `recforge data prepare` on synthetic interactions.

    python benchmarks/prepare.py --interactions 20000000            # generates, then prepares
    python benchmarks/prepare.py --input /path/interactions.parquet # prepares an existing file

The prepare step runs in a child process so its peak RSS is measured alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--interactions", type=int, default=20_000_000, help="target size of the synthetic set"
    )
    parser.add_argument(
        "--input", default=None, help="existing interactions Parquet (skips generation)"
    )
    parser.add_argument(
        "--workdir", default=None, help="where to write (default: a temp dir, removed after)"
    )
    parser.add_argument("--min-user", type=int, default=5)
    parser.add_argument("--min-item", type=int, default=5)
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="recforge-bench-"))
    rows = []
    try:
        src = args.input
        if src is None:
            from recforge.data.synth import SynthConfig, generate

            t0 = time.perf_counter()
            summary = generate(
                SynthConfig(
                    out=str(work / "synth"),
                    interactions=args.interactions,
                    mean_length=100.0,
                    items=max(1000, args.interactions // 400),
                    seed=0,
                ),
                overwrite=True,
            )
            rows.append(
                (
                    "synth",
                    f"{time.perf_counter() - t0:.1f}",
                    "-",
                    f"{summary.get('interactions', '?')}",
                )
            )
            src = str(work / "synth" / "interactions.parquet")
        out = work / "prepared"
        cmd = [
            sys.executable,
            "-m",
            "recforge.cli",
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
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
        manifest = json.loads((out / "manifest.json").read_text())
        rows.append(("prepare", f"{elapsed:.1f}", f"{peak_gb:.2f}", str(manifest["input_rows"])))
        print(f"{'step':<10}{'seconds':>10}{'peak GB':>10}{'rows':>14}")
        for step, sec, gb, n in rows:
            print(f"{step:<10}{sec:>10}{gb:>10}{n:>14}")
        print(
            f"prepare throughput: {manifest['input_rows'] / elapsed / 1e6:.2f} M interactions/s; "
            f"kept {manifest['interactions']} interactions, {manifest['users']} users, "
            f"{manifest['items']} items"
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
