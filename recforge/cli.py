"""The `recforge` entry point.

Each subcommand's package is imported only when it runs, so `recforge --help` is instant and
`recforge serve` never imports torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    from recforge.data import cli as data_cli

    parser = argparse.ArgumentParser(
        prog="recforge",
        description="Deep recommender training on TorchRec "
        "shards under Lightning, tracked in MLflow, served from ONNX.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="first argument only: show third-party INFO logs, progress bars and library "
        "warnings (also RECFORGE_VERBOSE=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, what in (
        ("fit", "train a model (LightningCLI; --help for its options)"),
        ("validate", "evaluate a checkpoint on the validation split"),
        ("test", "evaluate a checkpoint on the test split"),
    ):
        sub.add_parser(name, help=what, add_help=False)
    data_cli.add_parser(sub)
    sub.add_parser(
        "baselines",
        help="most-popular, Markov and EASE baselines through the evaluation code",
        add_help=False,
    )
    sub.add_parser(
        "tune",
        help="Optuna hyperparameter search over `recforge fit` runs (--help for its options)",
        add_help=False,
    )
    _add_export_parser(sub)
    serve = sub.add_parser(
        "serve", help="HTTP recommendations from an exported artifact (onnxruntime, CPU)"
    )
    serve.add_argument(
        "source",
        help="artifact directory, models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN/export",
    )
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--threads", type=int, default=1, help="onnxruntime intra-op threads per request"
    )
    serve.add_argument(
        "--index",
        choices=("auto", "exact", "hnsw"),
        default="auto",
        help="top-k search: exact matrix product, faiss HNSW, or auto (HNSW above 200k items)",
    )
    serve.add_argument(
        "--ef-search",
        type=int,
        default=512,
        help=(
            "HNSW search breadth: higher raises recall and latency "
            "(see benchmarks/serve_latency.py)"
        ),
    )
    serve.add_argument("--model-name", default="recforge", help="name on the KServe v2 routes")
    serve.add_argument(
        "--max-concurrency",
        type=int,
        default=64,
        help="recommendation/inference requests in flight at most; more get 503 with "
        "Retry-After at once (health, metrics, metadata exempt; 0: no limit; default 64)",
    )
    serve.add_argument(
        "--max-batch-size",
        type=int,
        default=64,
        help="dynamic batching: concurrent recommendation requests answered by one onnxruntime "
        "call and one top-k, at most this many (1: no batching; default 64)",
    )
    serve.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=500,
        help="how long a batch that is not full waits for more requests (default 500 µs)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes on the one port (SO_REUSEPORT); a reload reaches all (default 1)",
    )
    serve.add_argument(
        "--access-log",
        action="store_true",
        help="one log line per request (client, method, path, status; never the body)",
    )
    serve.add_argument(
        "--tracking-uri",
        help="MLflow URI for models:/ sources (default: $MLFLOW_TRACKING_URI, "
        "else sqlite:///mlflow.db)",
    )
    serve.set_defaults(func=_serve)
    forget = sub.add_parser(
        "forget-artifacts",
        help="remove users from an exported artifact's user store, or from every one in MLflow",
        description="Rewrite users.parquet without the listed users (and the manifest's sha256) "
        "in an artifact directory, or in every run export and registered model version of an "
        "MLflow tracking server. The weights keep what they learnt: retrain on data erased with "
        "`recforge data forget` to complete an erasure.",
    )
    forget.add_argument(
        "--users", required=True, metavar="FILE", help="ids one per line, or Parquet"
    )
    where = forget.add_mutually_exclusive_group(required=True)
    where.add_argument("artifact_dir", nargs="?", help="an artifact directory")
    where.add_argument("--mlflow-tracking-uri", help="rewrite every copy this server holds")
    forget.add_argument("--model", help="with --mlflow-tracking-uri: only this registered model")
    forget.set_defaults(func=_forget_artifacts)
    demo = sub.add_parser("demo", help="the whole path on synthetic data, offline, on CPU")
    demo.add_argument("--workdir", default="demo", help="where the demo writes its data and runs")
    demo.set_defaults(func=_demo)
    return parser


def _add_export_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "export", help="export a checkpoint to an ONNX artifact directory (docs/architecture.md §9)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--checkpoint",
        help="a recforge checkpoint directory (e.g. .../checkpoints/best-epoch=3.ckpt)",
    )
    source.add_argument(
        "--run-id", help="an MLflow run: exports its best checkpoint and logs into that run"
    )
    parser.add_argument("--out", required=True, help="artifact directory to write")
    parser.add_argument("--data-dir", help="prepared data, if not where the checkpoint was trained")
    parser.add_argument("--register", metavar="NAME", help="log to MLflow and register under NAME")
    parser.add_argument(
        "--alias", default="champion", help="alias of the new model version (default: champion)"
    )
    parser.add_argument(
        "--log-to-run", metavar="RUN_ID", help="MLflow run to log into (with --checkpoint)"
    )
    parser.add_argument(
        "--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"
    )
    parser.add_argument(
        "--tolerance", type=float, default=1e-4, help="parity: max |diff| of the user vector"
    )
    parser.add_argument(
        "--quantize",
        choices=("int8",),
        default=None,
        help="serve a dynamically int8-quantized model.onnx (checked against the float one)",
    )
    parser.add_argument(
        "--min-recall",
        type=float,
        default=0.9,
        help="--quantize: least recall@10 of the int8 model against the float one",
    )
    parser.add_argument(
        "--ann",
        choices=("auto", "hnsw", "none"),
        default="auto",
        help="write a faiss HNSW index of the items into the artifact, with its recall@10 vs "
        "exact search (auto: above 200,000 items), so serving does not build it",
    )
    parser.add_argument(
        "--user-store",
        choices=("none", "hashed", "full"),
        default="hashed",
        help="per-user data in the artifact: hashed (default: salted-hash keys, histories cut to "
        "what the model reads), none (requests carry the history), full (raw ids and histories)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--triton", metavar="DIR", help="also write a Triton model repository (onnxruntime backend)"
    )
    parser.add_argument(
        "--triton-name", default="recforge", help="model name in the Triton repository"
    )
    parser.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from recforge.trainer.export.onnx_export import run_cli

    return run_cli(args)


def _forget_artifacts(args: argparse.Namespace) -> int:
    from recforge.trainer.export.forget import run_cli

    return run_cli(args)


def _serve(args: argparse.Namespace) -> int:
    import os

    from recforge.serve.http import main as serve_main

    if args.tracking_uri is None and args.source.startswith(("models:/", "runs:/")):
        args.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    return serve_main(args)


def _demo(args: argparse.Namespace) -> int:
    from recforge.demo import run_demo

    return run_demo(args.workdir)


LIGHTNING_COMMANDS = ("fit", "validate", "test")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = bool(argv) and argv[0] in ("-v", "--verbose")
    argv = argv[1:] if verbose else argv
    _configure_logging(verbose or os.environ.get("RECFORGE_VERBOSE", "") not in ("", "0"))
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from recforge.data.erasure import StaleDatasetError
        from recforge.trainer.checkpoint import CheckpointError
        from recforge.trainer.export.callback import ExportAndRegister
        from recforge.trainer.host_memory import keep_freed_memory
        from recforge.trainer.lightning_cli import run
        from recforge.trainer.sharding import ShardingError
        from recforge.trainer.strategy import exit_failed_rank, in_process_group
        from recforge.trainer.tracking.logger import TrackingError

        keep_freed_memory()
        try:
            return run(argv, post_fit_callbacks=(ExportAndRegister,))
        except ShardingError as exc:
            # Every rank raises the same error (rank 0's plan failure is broadcast): one line.
            if _rank() == 0:
                print(f"recforge {argv[0]}: error: {exc}", file=sys.stderr)
            return exit_failed_rank(2)
        except (CheckpointError, TrackingError, StaleDatasetError) as exc:
            # A collective outcome (e.g. a checkpoint that could not be written) is raised alike
            # on every rank: rank 0 says it.
            if not getattr(exc, "every_rank", False) or _rank() == 0:
                print(f"recforge {argv[0]}: error: {exc}", file=sys.stderr)
            return exit_failed_rank(2)
        except Exception as exc:
            from recforge.trainer.strategy import peer_failure

            # A collective that failed because a peer rank died: one line naming it.
            line = peer_failure(exc)
            if line is None:
                if not in_process_group():
                    raise
                # The same abort at finalization as above: report it as Python would, then go.
                traceback.print_exc()
                return exit_failed_rank(1)
            print(f"recforge {argv[0]}: error: {line}", file=sys.stderr)
            return exit_failed_rank(1)
    if argv and argv[0] == "baselines":
        from recforge.trainer.evaluation.baselines import main as baselines_main

        return baselines_main(argv[1:])
    if argv and argv[0] == "tune":
        from recforge.trainer.tuning.study import main as tune_main

        return tune_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "data":
        from recforge.data import cli as data_cli

        return data_cli.run(args)
    return args.func(args)


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


# Libraries whose INFO lines (and routine warnings) say nothing a recforge user acts on: fbgemm's
# "Successfully loaded" per kernel library (logged on the root logger), TorchRec's planner
# tables, MLflow's database migrations, Lightning's hardware summary and tips.
_QUIET = {
    "torchrec": logging.ERROR,
    "fbgemm_gpu": logging.ERROR,
    "mlflow": logging.WARNING,
    "lightning.pytorch": logging.WARNING,
    "lightning.fabric": logging.WARNING,
    "alembic": logging.WARNING,
    "urllib3": logging.WARNING,
}


def _configure_logging(verbose: bool = False) -> None:
    """recforge's own INFO lines on rank zero (other ranks: warnings and worse); third-party
    INFO noise, progress bars and routine library warnings only with ``-v``."""
    import os
    import warnings

    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(fmt)
        root.addHandler(handler)
    own = logging.INFO if _rank() == 0 else logging.WARNING
    root.setLevel(logging.DEBUG if verbose and _rank() == 0 else logging.WARNING)
    logging.getLogger("recforge").setLevel(logging.DEBUG if verbose else own)
    if verbose:
        return
    for name, level in _QUIET.items():
        logging.getLogger(name).setLevel(level)
    # Lightning prints through its own handler too: without this every line came twice.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).propagate = False
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    # MLflow configures its own logger at import, from this variable.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", message=r"Please use DTensor instead and we are deprecating")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchrec\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"fbgemm_gpu\.")


if __name__ == "__main__":
    sys.exit(main())
