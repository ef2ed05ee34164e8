"""`python -m app score`: a Parquet or CSV file scored into another, out of core, by one stored version.

With `--engine spark` the scoring runs in Spark instead (app.engines.spark, imported only then).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from app.ml.preprocess import DataValidationError
from app.segmentations.as_of import as_of_date
from app.segmentations.kinds.registry import kind_of


def add_command(commands, segmentation_option) -> None:
    score = commands.add_parser(
        "score",
        help="score a Parquet or CSV file into another (the answers of /predict/batch)",
        description="Score every row of --input with a stored version and write the answer to --output, "
        "chunk by chunk: the input columns plus cluster, cluster_name, confidence and error (kind rfm: a "
        "transaction log in, one row per customer out). The suffix (.parquet or .csv) says each file's format.",
    )
    segmentation_option(score)
    score.add_argument("--version", default=None, help="a stored version (default: the active one)")
    score.add_argument("--input", type=Path, required=True, metavar="PATH", help="the rows to score")
    score.add_argument("--output", type=Path, required=True, metavar="PATH", help="where the answer goes")
    score.add_argument(
        "--as-of", default=None, metavar="DATE", help="kind rfm: RFM as of this day (default: the day after the last)"
    )
    engine_options(score)


def engine_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--engine",
        choices=("local", "spark"),
        default="local",
        help="local: this process, chunk by chunk (default); spark: Apache Spark (requirements-spark.txt)",
    )
    command.add_argument(
        "--master",
        default="local[2]",
        metavar="URL",
        help="--engine spark: local[N] or spark://host:7077 (default: local[2])",
    )


async def served_version(store, version: str | None):
    """The active version, or a stored one by its id (loaded from the database)."""
    from app.versions.served import ServedModel

    if version is None:
        return store.require()
    return ServedModel(await store.version_model(version))


async def score(args, store, _settings) -> int:
    from app.segmentations import batch_files as batch_scoring

    source, target = args.input, args.output
    try:
        batch_scoring.file_format(source)
        batch_scoring.file_format(target)
    except batch_scoring.UnsupportedFile as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not await asyncio.to_thread(source.exists):
        print(f"error: no such file or directory: {source}", file=sys.stderr)
        return 2
    kind = kind_of(store.segmentation)
    if args.as_of is not None and not kind.takes_as_of:
        print("error: --as-of is for segmentations of kind rfm", file=sys.stderr)
        return 2
    served = await served_version(store, args.version)
    if args.engine == "spark":
        from app.engines.spark.cli import score_with_spark

        return await score_with_spark(args, store, served)
    options: dict[str, Any] = {}
    if kind.takes_as_of:
        from app.segmentations.kinds import rfm as rfm_service

        options = {"rfm_columns": rfm_service.log_columns(store), "as_of": as_of_date(args.as_of)}
    try:
        total, unit = await asyncio.to_thread(batch_scoring.progress_total, source, kind.takes_as_of)
    except OSError as exc:
        print(f"error: cannot read {source}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception:  # not Parquet after all: the scorer words it
        total, unit = 0, "rows"
    print(f"Scoring {source} with version {served.version} of {store.segmentation.name} ...")
    bytes_unit = unit == "B"
    with tqdm(
        total=total or None,
        desc="Scoring",
        unit=unit,
        unit_scale=True,
        unit_divisor=1024 if bytes_unit else 1000,
        disable=None,
        file=sys.stderr,
    ) as bar:

        def advance(done: int) -> None:
            bar.update(max(0, done - bar.n))

        try:
            report = await asyncio.to_thread(
                batch_scoring.score_file, served, source, target, progress=advance, **options
            )
        except OSError as exc:
            print(f"error: cannot read or write: {exc.filename or ''} {exc.strerror or exc}", file=sys.stderr)
            return 2
        except DataValidationError as exc:
            print(f"error: {source}: {exc.message}", file=sys.stderr)
            return 2
    what = "customers" if kind.takes_as_of else "rows"
    print(
        f"Scored {report.rows:,} {what} into {target} ({report.failed:,} with an error) with version {report.model_version}"
    )
    return 0
