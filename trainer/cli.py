"""The `recforge` entry point.

Each subcommand's package is imported only when it runs, so `recforge --help` is instant and
`recforge serve` never imports torch.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from data import cli as data_cli

    parser = argparse.ArgumentParser(prog="recforge", description="Deep recommender training on TorchRec "
                                     "shards under Lightning, tracked in MLflow, served from ONNX.")
    sub = parser.add_subparsers(dest="command", required=True)
    data_cli.add_parser(sub)
    demo = sub.add_parser("demo", help="the whole path on synthetic data, offline, on CPU")
    demo.add_argument("--workdir", default="demo", help="where the demo writes its data and runs")
    demo.set_defaults(func=_demo)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from trainer.demo import run_demo

    return run_demo(args.workdir)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    if args.command == "data":
        from data import cli as data_cli

        return data_cli.run(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
