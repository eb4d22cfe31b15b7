"""`recforge data ...` subcommands: argument parsing over :mod:`recforge.data.prepare` and
:mod:`recforge.data.synth`."""

from __future__ import annotations

import argparse
import json
import sys

from recforge.data.errors import DataError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare or synthesise interaction data")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser(
        "prepare",
        help="raw interactions -> prepared dataset directory",
        description="Read interactions, validate, filter, build vocabularies, time-ordered "
        "sequences and the evaluation split; write a prepared directory atomically.",
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH_OR_GLOB",
        help="interaction files, directories or globs",
    )
    p.add_argument(
        "--format", required=True, choices=["parquet", "csv", "movielens", "recbole", "sasrec-txt"]
    )
    p.add_argument(
        "--out", required=True, help="output directory (must not exist unless --overwrite)"
    )
    p.add_argument("--user-col", default="user_id")
    p.add_argument("--item-col", default="item_id")
    p.add_argument("--time-col", default="timestamp")
    p.add_argument("--rating-col", default=None, help="optional rating/weight column to keep")
    p.add_argument("--delimiter", default=None, help="CSV delimiter (default ',' or tab for .tsv)")
    p.add_argument("--item-features", default=None, help="item features: Parquet or RecBole .item")
    p.add_argument("--user-features", default=None, help="user features: Parquet or RecBole .user")
    p.add_argument(
        "--item-feature-columns", default=None, help="comma-separated item feature columns to keep"
    )
    p.add_argument(
        "--user-feature-columns", default=None, help="comma-separated user feature columns to keep"
    )
    p.add_argument(
        "--list-columns",
        default=None,
        help=(
            "comma-separated feature columns whose strings hold several values "
            "(split on spaces or '|')"
        ),
    )
    p.add_argument(
        "--categorical-columns",
        default=None,
        help="comma-separated numeric feature columns to encode as categories",
    )
    p.add_argument(
        "--no-features",
        action="store_true",
        help="do not pick up RecBole .item/.user files beside the .inter",
    )
    p.add_argument("--min-user", type=int, default=0, help="k-core: minimum interactions per user")
    p.add_argument("--min-item", type=int, default=0, help="k-core: minimum interactions per item")
    p.add_argument(
        "--min-eval-users",
        type=int,
        default=1,
        help="fewest users with a validation and a test example; fewer is an error (default 1)",
    )
    p.add_argument("--split", default="leave-one-out", choices=["leave-one-out", "time"])
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="time split: share of interactions in validation",
    )
    p.add_argument(
        "--test-fraction", type=float, default=0.1, help="time split: share of interactions in test"
    )
    p.add_argument(
        "--row-group-size", type=int, default=4096, help="users per row group of sequences.parquet"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--engine",
        default="duckdb",
        choices=["duckdb", "memory"],
        help="duckdb: out of core, spills to disk (default); memory: all in RAM, the reference",
    )
    p.add_argument(
        "--memory-limit",
        default="4GB",
        help=(
            "duckdb engine: peak memory of the whole process (default 4GB; 1000-based units, "
            "KiB/MiB/GiB 1024-based); DuckDB gets 3/4 of it, at most the limit less 512MiB, "
            "and spills beyond, the rest is kept for Arrow/Python buffers"
        ),
    )
    p.add_argument(
        "--spill-dir",
        default=None,
        help="duckdb engine: where to spill (default: beside --out); removed afterwards",
    )
    p.add_argument(
        "--vocab-from",
        default=None,
        metavar="PREV_PREPARED_DIR",
        help="keep the user/item indices of a previous prepared directory (for warm starts); "
        "ids it does not know are appended after them in sorted order",
    )
    p.add_argument(
        "--opt-out",
        default=None,
        metavar="FILE",
        help="users to leave out: ids one per line, or Parquet with a --user-col/user_id column; "
        "the manifest counts them and records the list's sha256, never the ids",
    )
    p.add_argument(
        "--consent-col",
        default=None,
        metavar="COL",
        help="interaction column of true/false (or 1/0): rows with false are left out",
    )
    p.add_argument(
        "--erasure-ledger",
        default=None,
        metavar="PATH",
        help="erasure ledger of this input (default: erasures.jsonl beside the first --input); "
        "its users are left out and the dataset records where it is, for `data forget` and fit",
    )
    p.set_defaults(func=_prepare)

    f = sub.add_parser(
        "forget",
        help="remove users from a prepared dataset and record it in the erasure ledger",
        description="Rewrite PREPARED_DIR without the users listed in --users (and without "
        "those of ledger entries it lacks), atomically; append a salted-hash entry (no raw id) "
        "to the erasure ledger the dataset was prepared with. Trained models still hold what "
        "they learnt from these users: retrain on the result (docs/architecture.md, Personal "
        "data).",
    )
    f.add_argument(
        "--users",
        default=None,
        metavar="FILE",
        help="ids one per line, or Parquet with a user_id column; without it, only the "
        "ledger's entries this dataset lacks are applied",
    )
    f.add_argument("--ledger", default=None, help="ledger (default: the one the manifest names)")
    f.add_argument("prepared_dir", metavar="PREPARED_DIR")
    f.set_defaults(func=_forget)

    s = sub.add_parser(
        "synth", help="deterministic synthetic interactions with learnable structure"
    )
    s.add_argument("--out", required=True)
    s.add_argument(
        "--users", type=int, default=None, help="number of users (default 1000, or from N)"
    )
    s.add_argument("--items", type=int, default=500)
    s.add_argument(
        "--mean-length",
        type=float,
        default=None,
        help="mean interactions per user (default 30, or N / users)",
    )
    s.add_argument(
        "--interactions",
        type=int,
        default=None,
        metavar="N",
        help="total interactions, exactly N. With --users the mean length is N / users; "
        "otherwise users = round(N / mean length), mean length as given or 30. --interactions, "
        "--users and --mean-length together must agree. Without it the total is about "
        "users x mean length",
    )
    s.add_argument(
        "--block-rows",
        type=int,
        default=None,
        help="interactions generated and written at a time, one row group each (default "
        "2,000,000); memory grows with it, not with N. Changes the rows of sets over one block",
    )
    s.add_argument("--categories", type=int, default=20)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_synth)

    v = sub.add_parser(
        "validate",
        help="check a prepared directory (from any writer) against data/layout.py",
        description="Stream every file of a prepared directory and check schemas, vocabularies, "
        "sequences, the split and the manifest's counts; one line per problem, exit 2 if any.",
    )
    v.add_argument("directory", help="prepared dataset directory")
    v.add_argument("--max-problems", type=int, default=20, help="problems to print (default 20)")
    v.set_defaults(func=_validate)


def _csv_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _prepare(args: argparse.Namespace) -> int:
    from recforge.data.prepare import PrepareConfig, prepare
    from recforge.data.readers import Columns

    config = PrepareConfig(
        input=args.input,
        out=args.out,
        format=args.format,
        columns=Columns(
            user=args.user_col,
            item=args.item_col,
            timestamp=args.time_col,
            rating=args.rating_col,
            delimiter=args.delimiter,
            consent=args.consent_col,
        ),
        item_features=args.item_features,
        user_features=args.user_features,
        item_feature_columns=_csv_list(args.item_feature_columns),
        user_feature_columns=_csv_list(args.user_feature_columns),
        list_columns=_csv_list(args.list_columns) or [],
        categorical_columns=_csv_list(args.categorical_columns) or [],
        no_features=args.no_features,
        min_user=args.min_user,
        min_item=args.min_item,
        min_eval_users=args.min_eval_users,
        split=args.split,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        row_group_size=args.row_group_size,
        overwrite=args.overwrite,
        engine=args.engine,
        memory_limit=args.memory_limit,
        spill_dir=args.spill_dir,
        vocab_from=args.vocab_from,
        opt_out=args.opt_out,
        erasure_ledger=args.erasure_ledger,
    )
    manifest = prepare(config)
    summary = {
        k: manifest[k]
        for k in (
            "users",
            "items",
            "interactions",
            "input_rows",
            "rows_removed",
            "rows_out_of_time_order",
            "split_counts",
        )
    }
    if "consent" in manifest:
        summary["consent"] = manifest["consent"]
    print(f"prepared {args.out}")
    print(json.dumps(summary, indent=2))
    return 0


def _forget(args: argparse.Namespace) -> int:
    from recforge.data.erasure import forget

    summary = forget(args.prepared_dir, args.users, args.ledger)
    print(f"forgot {summary['users_removed']} user(s) in {args.prepared_dir}")
    print(json.dumps(summary, indent=2))
    return 0


def _synth(args: argparse.Namespace) -> int:
    import re

    from recforge.data.synth import SynthConfig, generate

    # Unset sizes stay None for SynthConfig to derive, so --interactions can fill them in.
    block_rows = {} if args.block_rows is None else {"block_rows": args.block_rows}
    try:
        config = SynthConfig(
            out=args.out,
            users=args.users,
            items=args.items,
            mean_length=args.mean_length,
            interactions=args.interactions,
            categories=args.categories,
            seed=args.seed,
            **block_rows,
        )
    except ValueError as exc:
        # Name the option the user typed rather than the config field behind it.
        option = re.sub(r"^SynthConfig\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), str(exc))
        raise ValueError(option) from exc
    summary = generate(config, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from recforge.data.validate import validate

    report = validate(args.directory)
    if report.ok:
        print(report.summary())
        return 0
    for line in report.lines(args.max_problems):
        print(line, file=sys.stderr)
    count = f"{len(report.problems)} problem(s)"
    print(f"recforge data validate: error: {args.directory}: {count}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except (DataError, ValueError, FileExistsError) as exc:
        print(f"recforge data {args.data_command}: error: {exc}", file=sys.stderr)
        return 2
