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
    for name, what in (("fit", "train a model (LightningCLI; --help for its options)"),
                       ("validate", "evaluate a checkpoint on the validation split"),
                       ("test", "evaluate a checkpoint on the test split")):
        sub.add_parser(name, help=what, add_help=False)
    data_cli.add_parser(sub)
    sub.add_parser("baselines", help="most-popular and Markov baselines through the evaluation code",
                   add_help=False)
    demo = sub.add_parser("demo", help="the whole path on synthetic data, offline, on CPU")
    demo.add_argument("--workdir", default="demo", help="where the demo writes its data and runs")
    demo.set_defaults(func=_demo)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from trainer.demo import run_demo

    return run_demo(args.workdir)


LIGHTNING_COMMANDS = ("fit", "validate", "test")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _configure_logging()
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from trainer.checkpoint import CheckpointError
        from trainer.lightning_cli import run

        try:
            return run(argv)
        except CheckpointError as exc:
            print(f"recforge {argv[0]}: error: {exc}", file=sys.stderr)
            return 2
    if argv and argv[0] == "baselines":
        from trainer.baselines import main as baselines_main

        return baselines_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "data":
        from data import cli as data_cli

        return data_cli.run(args)
    return args.func(args)


def _configure_logging() -> None:
    """INFO logs on rank zero only; other ranks warn and worse."""
    import os

    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


if __name__ == "__main__":
    sys.exit(main())
