"""The command line as an operator runs it: generate, train, list, predict, create accounts."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment of a fresh installation in tmp_path; the commands run there, away from any .env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "MODEL_", "DATA_", "APP_ENV"))}
    env.update(
        PYTHONPATH=str(ROOT),
        DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}",
        MODEL_DIR=str(tmp_path / "models"),
        DATA_PATH=str(tmp_path / "customers.csv"),
        SECRET_KEY="cli-test-secret-key-that-is-long-enough-0123",
        BCRYPT_ROUNDS="4",
    )
    return env


def run(env: dict[str, str], cwd: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_generate_train_list_and_predict(tmp_path, cli_env):
    csv = tmp_path / "customers.csv"
    generated = run(cli_env, tmp_path, str(ROOT / "generate_dataset.py"), "--rows", "800", "--out", str(csv))
    assert generated.returncode == 0, generated.stderr
    assert csv.is_file()

    trained = run(cli_env, tmp_path, "-m", "app", "train", "--csv", str(csv), "--k", "5")
    assert trained.returncode == 0, trained.stderr
    version = re.search(r"Model (\S+): k=5", trained.stdout).group(1)
    assert len(re.findall(r"^\s+\d: .+ \(\d+ customers", trained.stdout, re.MULTILINE)) == 5
    assert (tmp_path / "models" / "kmeans.pkl").is_file()

    listed = run(cli_env, tmp_path, "-m", "app", "models")
    assert listed.returncode == 0, listed.stderr
    assert re.search(rf"^\* {re.escape(version)}\s+k=5 .*by=cli", listed.stdout, re.MULTILINE), listed.stdout

    predicted = run(
        cli_env,
        tmp_path,
        "-m",
        "app",
        "predict",
        "--sex",
        "female",
        "--age",
        "29",
        "--income",
        "85",
        "--spending",
        "82",
        "--frequency",
        "40",
    )
    assert predicted.returncode == 0, predicted.stderr
    answer = json.loads(predicted.stdout)
    assert answer["cluster_name"] and 0 <= answer["cluster"] < 5 and 0 <= answer["confidence"] <= 1
    assert answer["model_version"] == version

    # Without a terminal there are no progress bars to garble captured output.
    assert "\r" not in trained.stderr


def test_training_on_a_bad_csv_says_what_is_wrong_and_exits_2(tmp_path, cli_env):
    bad = tmp_path / "bad.csv"
    bad.write_text("Age,Annual_Income,Spending_Score,Purchase_Frequency\n30,55.0,40,12\n31,lots,50,10\n")
    result = run(cli_env, tmp_path, "-m", "app", "train", "--csv", str(bad))
    assert result.returncode == 2
    assert "annual_income" in result.stderr and "line 3" in result.stderr and "lots" in result.stderr
    assert "Traceback" not in result.stderr

    missing_columns = tmp_path / "columns.csv"
    missing_columns.write_text("name,city\nAna,Porto\n")
    result = run(cli_env, tmp_path, "-m", "app", "train", "--csv", str(missing_columns))
    assert result.returncode == 2 and "missing" in result.stderr.lower() and "Traceback" not in result.stderr

    result = run(cli_env, tmp_path, "-m", "app", "train", "--csv", str(tmp_path / "absent.csv"))
    assert result.returncode == 2 and "no such file" in result.stderr
    assert not (tmp_path / "models" / "kmeans.pkl").exists()


def test_predict_without_a_model_says_train_first(tmp_path, cli_env):
    result = run(
        cli_env,
        tmp_path,
        "-m",
        "app",
        "predict",
        "--age",
        "30",
        "--income",
        "50",
        "--spending",
        "50",
        "--frequency",
        "10",
    )
    assert result.returncode == 2 and "train" in result.stderr.lower() and "Traceback" not in result.stderr


def test_create_admin_help_explains_every_flag(tmp_path, cli_env):
    result = run(cli_env, tmp_path, str(ROOT / "create_admin.py"), "--help")
    assert result.returncode == 0
    text = result.stdout
    for flag in (
        "--username",
        "--password",
        "--email",
        "--full-name",
        "--role",
        "--test-username",
        "--test-password",
        "--no-test-user",
    ):
        match = re.search(rf"^\s+{flag}\b[^\n]*?(?:\s{{2,}}|\n\s+)(\S[^\n]+)", text, re.MULTILINE)
        assert match, f"{flag} has no explanation"
    for topic in ("DATABASE_URL", "APP_ENV", "production", "examples"):
        assert topic in text


def test_create_admin_then_app_help(tmp_path, cli_env):
    created = run(
        cli_env,
        tmp_path,
        str(ROOT / "create_admin.py"),
        "--username",
        "ops",
        "--password",
        "ops-password-1",
        "--no-test-user",
    )
    assert created.returncode == 0 and "Created user 'ops'" in created.stdout
    again = run(
        cli_env,
        tmp_path,
        str(ROOT / "create_admin.py"),
        "--username",
        "ops",
        "--password",
        "ops-password-1",
        "--no-test-user",
    )
    assert again.returncode == 0 and "already exists" in again.stdout
    helped = run(cli_env, tmp_path, "-m", "app", "train", "--help")
    assert helped.returncode == 0 and "--csv" in helped.stdout and "--k" in helped.stdout


def test_reading_progress_follows_the_bytes_read(tmp_path):
    from app.__main__ import read_training_csv
    from generate_dataset import generate

    csv = tmp_path / "customers.csv"
    generate(rows=3000, seed=1).to_csv(csv, index=False)
    seen: list[int] = []

    class Recorder(tqdm):
        def update(self, n=1):
            seen.append(n)
            return super().update(n)

    import app.__main__ as cli

    original = cli.tqdm
    cli.tqdm = Recorder
    try:
        features = read_training_csv(csv, progress=True)
    finally:
        cli.tqdm = original
    assert features.shape == (3000, 4)
    assert sum(seen) == csv.stat().st_size and all(n >= 0 for n in seen)


def test_progress_bar_draws_on_a_terminal_stream(tmp_path):
    from app.__main__ import _ProgressFile

    csv = tmp_path / "small.csv"
    csv.write_bytes(b"x" * 10_000)
    out = io.StringIO()
    with tqdm(total=10_000, file=out, disable=False, mininterval=0) as bar:
        with io.BufferedReader(_ProgressFile(csv, bar), buffer_size=1024) as fh:
            while fh.read(700):
                pass
        assert bar.n == 10_000
    assert "100%" in out.getvalue()


def create_segmentation(tmp_path: Path, cli_env: dict[str, str], **declared) -> None:
    """Create a segmentation in the CLI's database, as the service would."""
    import asyncio

    from app.core.database import Database
    from app.core.migrations import upgrade_database
    from app.segmentations.registry import SegmentationRegistry
    from app.versions.store import ModelStore
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, cli_env["DATABASE_URL"])

    async def create() -> None:
        database = Database(settings.database_url)
        try:
            await upgrade_database(database)
            registry = SegmentationRegistry(
                settings=settings, database=database, default=ModelStore(settings=settings, database=database)
            )
            await registry.start(follow=False)
            await registry.create(
                **{"description": None, "features": None, "id_column": None, "created_by": "test"} | declared
            )
        finally:
            await database.dispose()

    asyncio.run(create())


def test_train_list_and_predict_a_named_segmentation(tmp_path, cli_env):
    """`--segmentation NAME` points train, models and predict at a custom segmentation; --input is --csv."""

    from generate_dataset import generate_mixed, mixed_features

    create_segmentation(
        tmp_path, cli_env, name="mixed", kind="custom", features=mixed_features(), id_column="customer_id"
    )
    mixed = generate_mixed(rows=1500, seed=3)
    source = tmp_path / "mixed.csv"
    mixed.to_csv(source, index=False)

    trained = run(cli_env, tmp_path, "-m", "app", "train", "--segmentation", "mixed", "--input", str(source))
    assert trained.returncode == 0, trained.stderr
    version = re.search(r"Model (\S+): k=(\d+)", trained.stdout).group(1)
    assert not (tmp_path / "models" / "kmeans.pkl").exists()  # only `default` keeps files in models/
    listed = run(cli_env, tmp_path, "-m", "app", "models", "--segmentation", "mixed")
    assert re.search(rf"^\* {re.escape(version)}\s", listed.stdout, re.MULTILINE), listed.stdout
    assert "No model versions" in run(cli_env, tmp_path, "-m", "app", "models").stdout

    customer = mixed.drop(columns=["customer_id"]).iloc[0].to_dict()
    customer["plan"] = "platinum-unheard-of"
    predicted = run(
        cli_env,
        tmp_path,
        "-m",
        "app",
        "predict",
        "--segmentation",
        "mixed",
        "--customer",
        json.dumps({k: (v.item() if hasattr(v, "item") else v) for k, v in customer.items()}),
    )
    assert predicted.returncode == 0, predicted.stderr
    answer = json.loads(predicted.stdout)
    assert answer["model_version"] == version and any("platinum" in w for w in answer["warnings"])
    unknown = run(cli_env, tmp_path, "-m", "app", "models", "--segmentation", "nope")
    assert unknown.returncode == 2 and "not found" in unknown.stderr


def test_train_an_rfm_segmentation_from_a_log_and_predict(tmp_path, cli_env):
    """`python -m app train --segmentation NAME --input LOG` aggregates a transaction log with a bar."""

    from generate_transactions import generate

    create_segmentation(tmp_path, cli_env, name="shop", kind="rfm")
    log, _ = generate(2000, 5)
    source = tmp_path / "orders.csv"
    log.to_pandas().to_csv(source, index=False)

    trained = run(
        cli_env,
        tmp_path,
        "-m",
        "app",
        "train",
        "--segmentation",
        "shop",
        "--input",
        str(source),
        "--as-of",
        "2026-01-01",
    )
    assert trained.returncode == 0, trained.stderr
    assert f"{log.num_rows:,} rows: 2,000 customers as of 2026-01-01" in trained.stdout
    assert "% of revenue" in trained.stdout
    version = re.search(r"Model (\S+): k=(\d+)", trained.stdout).group(1)

    predicted = run(
        cli_env,
        tmp_path,
        "-m",
        "app",
        "predict",
        "--segmentation",
        "shop",
        "--customer",
        json.dumps({"recency_days": 3, "frequency": 25, "monetary": 1800.0}),
    )
    assert predicted.returncode == 0, predicted.stderr
    answer = json.loads(predicted.stdout)
    assert answer["model_version"] == version
    assert answer["customer_data"]["f_score"] == 5 and answer["customer_data"]["rfm_segment"]

    bad = tmp_path / "bad.csv"
    bad.write_text("customer_id,date,amount\n1,2024-01-01,five\n")
    refused = run(cli_env, tmp_path, "-m", "app", "train", "--segmentation", "shop", "--input", str(bad))
    assert refused.returncode == 2 and "line 2, amount: not a number" in refused.stderr
