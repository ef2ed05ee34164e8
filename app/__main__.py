"""Command line: `python -m app train|predict|models|score|run`, each for one segmentation (`--segmentation`).

It uses the same database and model folder as the service, so a model trained here
becomes the active version the running service switches to.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from app import scoring_cli
from app.core.config import get_settings
from app.core.database import Database
from app.core.errors import AppError
from app.core.migrations import upgrade_database
from app.core.observability import configure_logging
from app.customers import cli as customer_cli
from app.ml.preprocess import DataValidationError, load_training_matrix
from app.segmentations.as_of import as_of_date
from app.segmentations.kinds.registry import kind_of

ENVIRONMENT_HELP = """\
environment (or .env):
  DATABASE_URL   the service's database, where model versions are recorded
  MODEL_DIR      the local copy of the active model (default: models)
  DATA_PATH      the default training CSV (default: data/customers.csv)
  LOG_LEVEL, LOG_FORMAT  as for the service

Progress bars are drawn on stderr when it is a terminal.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app",
        description="Customer Segmentation from the shell.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show the service's informational log lines (default: warnings only)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def segmentation_option(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--segmentation", default="default", metavar="NAME", help="which segmentation (default: default)"
        )

    train = commands.add_parser("train", help="train a new model version and make it active")
    segmentation_option(train)
    train.add_argument(
        "--input",
        "--csv",
        dest="csv",
        type=Path,
        default=None,
        help="training CSV, or a transaction log for kind rfm (default: DATA_PATH)",
    )
    train.add_argument("--k", type=int, default=None, help="number of segments, 2..20 (default: chosen by silhouette)")
    train.add_argument("--random-state", type=int, default=42, help="seed for reproducible segments (default: 42)")
    train.add_argument(
        "--as-of", default=None, metavar="DATE", help="kind rfm: RFM as of this day (default: the day after the last)"
    )
    scoring_cli.engine_options(train)

    predict = commands.add_parser("predict", help="which segment is one customer in")
    segmentation_option(predict)
    predict.add_argument(
        "--customer", default=None, metavar="JSON", help="the customer as JSON (segmentations other than customer kind)"
    )
    predict.add_argument("--sex", default="Other", help="Male, Female or Other")
    predict.add_argument("--age", type=int, help="age in years, 18..100")
    predict.add_argument("--income", type=float, help="annual income in thousands")
    predict.add_argument("--spending", type=int, help="spending score 1..100")
    predict.add_argument("--frequency", type=int, help="purchases per year")

    models = commands.add_parser("models", help="list model versions, newest first")
    segmentation_option(models)
    scoring_cli.add_command(commands, segmentation_option)
    customer_cli.add_command(commands, segmentation_option)
    return parser


async def _with_store(name: str, action):
    from app.segmentations.registry import SegmentationRegistry
    from app.versions.store import ModelStore
    from app.webhooks.outbox import Outbox

    settings = get_settings()
    database = Database(settings.database_url)
    try:
        await upgrade_database(database)
        # Activations made here are announced like the service's own (the service's workers deliver them).
        default = ModelStore(settings=settings, database=database, events=Outbox())
        if name == "default":
            await default.start(follow=False)
        registry = SegmentationRegistry(settings=settings, database=database, default=default)
        await registry.start(follow=False)
        return await action(await registry.get(name), settings)
    finally:
        await database.dispose()


class _ProgressFile(io.FileIO):
    """A file that moves a progress bar to how far into it the reader has got."""

    def __init__(self, path: Path, bar: tqdm) -> None:
        super().__init__(path, "rb")
        self._bar = bar

    def _advance(self) -> None:
        position = self.tell()
        if position > self._bar.n:  # the header is read twice: count each byte once
            self._bar.update(position - self._bar.n)

    def readinto(self, buffer) -> int | None:
        count = super().readinto(buffer)
        self._advance()
        return count

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        self._advance()
        return data


def _bytes_bar(total: int, description: str, progress: bool | None) -> tqdm:
    """A bar over the bytes of a file, on stderr (drawn when it is a terminal, unless `progress` says)."""
    return tqdm(
        total=total,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=None if progress is None else not progress,
        file=sys.stderr,
    )


def read_training_csv(path: Path, *, progress: bool | None = None, schema=None):
    """The validated feature matrix of `path` (with `schema`, a declared FeatureSchema: its training frame),
    with a bar over the bytes read (chunk by chunk)."""
    total = path.stat().st_size
    with _bytes_bar(total, "Reading CSV", progress) as bar:
        with io.BufferedReader(_ProgressFile(path, bar)) as fh:
            if schema is None:
                features = load_training_matrix(fh)
            else:
                from app.ml.frames import read_training_frame

                features = read_training_frame(fh, schema)
        bar.update(total - bar.n)
    return features


async def _with_timer(description: str, work):
    """Await `work` while a line shows how long it has been running.

    Fitting is one opaque step, so this is a timer, not a percentage.
    """
    with tqdm(desc=description, bar_format="{desc}: {elapsed}", disable=None, file=sys.stderr) as timer:

        async def tick() -> None:
            while True:
                await asyncio.sleep(0.5)
                timer.refresh()

        ticker = asyncio.create_task(tick())
        try:
            return await work
        finally:
            ticker.cancel()


async def _train(args, store, settings) -> int:
    source = Path(args.csv or settings.data_path)
    info = store.segmentation
    kind = kind_of(info)
    if args.engine == "spark" and not kind.takes_as_of:  # a file or a Parquet dataset's directory, read by Spark
        from app.engines.spark.cli import train_with_spark

        return await train_with_spark(args, store, source)
    if args.engine == "spark":
        if not await asyncio.to_thread(source.exists):
            print(f"error: no such file or directory: {source}", file=sys.stderr)
            return 2
    elif not await asyncio.to_thread(source.is_file):
        print(f"error: no such file: {source}", file=sys.stderr)
        return 2
    print(f"Reading {source} ...")
    if kind.takes_as_of:  # a transaction log, summed per customer
        return await _train_rfm(args, store, source)
    if args.as_of is not None:
        print("error: --as-of is for segmentations of kind rfm", file=sys.stderr)
        return 2
    schema = None if kind.default_dataset else kind.schema(info)
    if await asyncio.to_thread(_out_of_core, source):
        return await _train_file(args, store, settings, source, schema)
    try:
        features = await asyncio.to_thread(read_training_csv, source, schema=schema)
    except OSError as exc:
        print(f"error: cannot read {source}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except DataValidationError as exc:
        _print_problems(source, exc)
        return 2
    print(f"Training on {len(features):,} rows" + (f" with k={args.k}" if args.k else " (choosing k)") + " ...")
    try:
        served = await _with_timer(
            "Training",
            store.train(
                features,
                n_clusters=args.k,
                random_state=args.random_state,
                created_by="cli",
                schema=schema.to_dict() if schema is not None else None,
            ),
        )
    except DataValidationError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    _print_model(served)
    return 0


def _out_of_core(source: Path) -> bool:
    from app.segmentations.scoring import out_of_core_upload

    with source.open("rb") as fh:
        return out_of_core_upload(fh)


async def _train_file(args, store, settings, source: Path, schema=None) -> int:
    """A Parquet file, or a CSV too large to read here: the training process reads it in chunks."""
    from app.ml.outofcore import TrainingFile

    training = TrainingFile(
        source, in_memory_rows=settings.train_in_memory_rows, sample_rows=settings.train_sample_rows
    )
    print(
        "Training from the file in chunks" + (f" with k={args.k}" if args.k else " (choosing k on a sample)") + " ..."
    )
    try:
        served = await _with_timer(
            "Training",
            store.train(
                training,
                n_clusters=args.k,
                random_state=args.random_state,
                created_by="cli",
                schema=schema.to_dict() if schema is not None else None,
            ),
        )
    except DataValidationError as exc:
        _print_problems(source, exc)
        return 2
    streamed = served.metadata.get("out_of_core")
    if streamed:
        print(
            f"Out of core: k chosen on a sample of {streamed['sample_rows']:,} rows, "
            f"{streamed['lloyd_passes']} passes over {served.metadata['n_samples']:,} rows"
        )
    _print_model(served)
    return 0


def _print_model(served) -> None:
    meta = served.metadata
    print(
        f"Model {served.version}: k={meta['n_clusters']}, silhouette={meta.get('silhouette_score')}, "
        f"{meta.get('duration_seconds')} s"
    )
    for segment in served.segments:
        revenue = f", {segment['revenue_share']}% of revenue" if "revenue_share" in segment else ""
        print(
            f"  {segment['cluster_id']}: {segment['cluster_name']} ({segment['size']} customers, "
            f"{segment['percentage']}%{revenue})"
        )


def _print_problems(source: Path, exc: DataValidationError) -> None:
    print(f"error: {source}: {exc.message}", file=sys.stderr)
    for problem in exc.problems:
        where = ", ".join(
            str(p) for p in (problem.get("line") and f"line {problem['line']}", problem.get("column")) if p
        )
        print(f"  {where + ': ' if where else ''}{problem['reason']}", file=sys.stderr)


def read_log_file(path: Path, columns, *, as_of=None, progress: bool | None = None):
    """The RFM table of a transaction log to train on (no ids), with a bar over the bytes read."""
    from app.ml.rfm import read_log

    total = path.stat().st_size
    with _bytes_bar(total, "Reading log", progress) as bar:

        def advance(done: int) -> None:
            bar.update(max(0, min(done, total) - bar.n))

        table = read_log(path, columns, as_of=as_of, progress=advance, ids=False)  # to train on
        bar.update(total - bar.n)
    return table


async def _train_rfm(args, store, source: Path) -> int:
    from app.segmentations.kinds import rfm as rfm_service

    spark = args.engine == "spark"
    try:
        as_of = as_of_date(args.as_of)
        columns = rfm_service.log_columns(store)
        if spark:  # the log summed per customer where Spark reads it; the table trains here
            from app.engines.spark.cli import read_log_with_spark

            table = await read_log_with_spark(args.master, source, columns, as_of=as_of)
        else:
            table = await asyncio.to_thread(read_log_file, source, columns, as_of=as_of)
    except OSError as exc:
        print(f"error: cannot read {source}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except DataValidationError as exc:
        _print_problems(source, exc)
        return 2
    facts = table.facts
    left_out = (
        "left out (no customer id, or a date or amount that cannot be read)" if spark else "without a customer id"
    )
    print(
        f"{facts.n_transactions:,} rows: {len(table.frame):,} customers as of {facts.as_of.isoformat()} "
        f"({facts.skipped_rows:,} rows {left_out}, {facts.rows_after_as_of:,} after as_of, "
        f"{facts.skipped_customers:,} customers without a counted purchase)"
    )
    print(f"Training on {len(table.frame):,} customers" + (f" with k={args.k}" if args.k else " (choosing k)") + " ...")
    try:
        served = await _with_timer(
            "Training",
            rfm_service.train_table(store, table, n_clusters=args.k, random_state=args.random_state, by="cli"),
        )
    except DataValidationError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    _print_model(served)
    return 0


async def _predict(args, store, _settings) -> int:
    from app.segmentations.kinds.customer_record import CustomerFeatures

    served = store.require()
    kind = kind_of(store.segmentation)
    if not kind.default_dataset or args.customer is not None:
        from app.segmentations.service import customer_adapter

        if args.customer is None:
            print("error: give the customer with --customer JSON", file=sys.stderr)
            return 2
        checked = customer_adapter(store).validate_json(args.customer)
        assigned = kind.assign(served, checked, transactions=None, as_of=None)
        answer = {
            "cluster": assigned.cluster,
            "cluster_name": assigned.cluster_name,
            "confidence": round(assigned.confidence, 4),
        }
        if kind.takes_as_of:  # the customer's whole RFM row
            print(json.dumps({**answer, "customer_data": assigned.data, "model_version": served.version}))
        else:
            print(json.dumps({**answer, "model_version": served.version, "warnings": assigned.warnings}))
        return 0
    missing = [f"--{o}" for o in ("age", "income", "spending", "frequency") if getattr(args, o) is None]
    if missing:
        print(f"error: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    customer = CustomerFeatures.model_validate(
        {
            "sex": args.sex,
            "age": args.age,
            "annual_income": args.income,
            "spending_score": args.spending,
            "purchase_frequency": args.frequency,
        }
    )
    cluster, name, confidence = served.assign([customer])[0]
    print(
        json.dumps(
            {
                "cluster": cluster,
                "cluster_name": name,
                "confidence": round(confidence, 4),
                "model_version": served.version,
            }
        )
    )
    return 0


async def _models(_args, store, _settings) -> int:
    versions, active = await store.list_versions()
    if not versions:
        print("No model versions yet: python -m app train")
    for v in versions:
        mark = "*" if v["active"] else " "
        print(
            f"{mark} {v['version']}  k={v['n_clusters']}  silhouette={v['silhouette_score']}  "
            f"n={v['n_samples']}  by={v['created_by'] or '-'}  {v['created_at']:%Y-%m-%d %H:%M}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {
        "train": _train,
        "predict": _predict,
        "models": _models,
        "score": scoring_cli.score,
        "run": customer_cli.run,
    }[args.command]
    try:
        configure_logging(get_settings())
        if not args.verbose:
            logging.getLogger("app").setLevel(max(logging.getLogger("app").level, logging.WARNING))
        return asyncio.run(_with_store(args.segmentation, lambda store, settings: handler(args, store, settings)))
    except AppError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except Exception as exc:  # argument values that break a rule, and the like
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
