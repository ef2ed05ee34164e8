"""The README's tour, run as written against a live server, so the tour cannot rot.

The shell blocks the README marks with an HTML comment starting `<!-- tour` (the five-minute tour
and the custom-columns example) are run in order in one bash process, from the checkout's root, as
someone does in the terminal beside `make run`. The server is `uvicorn app.main:app` on a free port of
127.0.0.1, with a temporary SQLite database, model folder and a small default dataset (2,000 rows), an
`admin`/`admin123` account from create_admin.py and a first model from `python -m app train`: what
`make run` leaves behind, so the tour's own steps take seconds.

The block marked `<!-- postgres tour` (a monthly policy on a PostgreSQL table) runs the same way
against a server started with SOURCE_ALLOW_PRIVATE=true, on a database of its own beside
TEST_DATABASE_URL's; without TEST_DATABASE_URL or psql it is skipped, saying why.

What the test changes in the blocks, and nothing else:
- `http://127.0.0.1:8000` becomes this server's address (and the PostgreSQL tour's `crm` database
  at 127.0.0.1:5432 becomes the test's own);
- `.venv/bin/python` becomes the Python running the tests when the checkout has no `.venv` of its own
  (a worktree sharing another checkout's virtualenv);
- the script starts with `set -euo pipefail`, so a failing command (`curl -sf` on an error status)
  fails the block, and each block announces itself so a failure names it.
TMPDIR points at the test's temporary folder, so the tour's `mktemp -d` lands there. The checkout must
hold the same files afterwards (caches such as __pycache__ aside).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from generate_dataset import generate
from tests.conftest import TEST_SECRET
from tests.test_multiprocess import Server, run

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
ADDRESS = "http://127.0.0.1:8000"
BLOCK = re.compile(r"^<!-- tour.*?-->\n```bash\n(.*?)^```$", re.MULTILINE | re.DOTALL)
POSTGRES_BLOCK = re.compile(r"^<!-- postgres tour.*?-->\n```bash\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# Left behind by other tools or running tests, never by the tour.
IGNORED_PARTS = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "htmlcov", ".ruff_cache"}

pytestmark = pytest.mark.slow


def tour_blocks() -> list[str]:
    blocks = BLOCK.findall(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 2, "README.md lost its marked tour blocks (<!-- tour ... --> before ```bash)"
    return blocks


def checkout_files() -> set[str]:
    files = set()
    for path in ROOT.rglob("*"):
        relative = path.relative_to(ROOT)
        if IGNORED_PARTS.intersection(relative.parts) or relative.name.startswith(".coverage"):
            continue
        files.add(str(relative))
    return files


def start_server(tmp_path: Path, **extra: str) -> tuple[Server, Path]:
    """What `make run` leaves behind, on a temporary SQLite database and model folder."""
    home = tmp_path / "server"
    home.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": f"sqlite+aiosqlite:///{home / 'tour.db'}",
        "MODEL_DIR": str(home / "models"),
        "DATA_PATH": str(home / "customers.csv"),
        "JOB_DIR": str(home / "jobs"),
        "SECRET_KEY": TEST_SECRET,
        "BCRYPT_ROUNDS": "4",
        "MODEL_SYNC_SECONDS": "0.2",
        "LOG_LEVEL": "WARNING",
        **extra,
    }
    generate(rows=2000, seed=3).to_csv(home / "customers.csv", index=False)
    run(env, home, str(ROOT / "create_admin.py"))
    run(env, home, "-m", "app", "train", "--csv", str(home / "customers.csv"))
    return Server(home, env, "tour").wait_ready(), home


def run_blocks(server: Server, home: Path, tmp_path: Path, blocks: list[str], replace: dict[str, str]):
    """The blocks in one bash process from the checkout's root; the checkout keeps the same files."""
    script = ["set -euo pipefail"]
    for number, block in enumerate(blocks, 1):
        for old, new in {ADDRESS: server.url, **replace}.items():
            block = block.replace(old, new)
        if not (ROOT / ".venv" / "bin" / "python").exists():
            block = block.replace(".venv/bin/python", sys.executable)
        script += [f"echo '=== tour block {number}' >&2", block]
    before = checkout_files()
    try:
        result = subprocess.run(
            ["bash", "-c", "\n".join(script)],
            cwd=ROOT,
            env={**os.environ, "TMPDIR": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.stop()
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}\n{(home / 'tour.log').read_text()}"
    )
    assert checkout_files() == before, f"the tour left files in the checkout: {checkout_files() - before}"
    return result


def test_the_readme_tour_runs_as_written(tmp_path):
    server, home = start_server(tmp_path)
    result = run_blocks(server, home, tmp_path, tour_blocks(), {})
    assert "=== tour block 2" in result.stderr
    assert '"segmentation":"crm"' in result.stdout


README_DATABASE = "postgresql://postgres@127.0.0.1:5432/crm"


def test_the_readme_policy_tour_on_postgresql_runs_as_written(tmp_path):
    """The monthly policy on a PostgreSQL table, end to end, on a database of its own beside
    TEST_DATABASE_URL's (the README's `crm`), created afresh with no `segments_reader` role left."""
    url = os.environ.get("TEST_DATABASE_URL")
    if not url:
        pytest.skip("TEST_DATABASE_URL is not set: the README's PostgreSQL policy tour needs a PostgreSQL server")
    if shutil.which("psql") is None:
        pytest.skip("no psql (apt-get install postgresql-client): the README's PostgreSQL tour uses it")
    (block,) = POSTGRES_BLOCK.findall(README.read_text(encoding="utf-8"))
    base = make_url(url)
    crm = base.set(drivername="postgresql", database=f"{base.database}_crm_tour")
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    for statement in (
        f'DROP DATABASE IF EXISTS "{crm.database}" WITH (FORCE)',
        "DROP ROLE IF EXISTS segments_reader",
        f'CREATE DATABASE "{crm.database}"',
    ):
        subprocess.run(["psql", admin, "-q", "-v", "ON_ERROR_STOP=1", "-c", statement], check=True, timeout=60)
    server, home = start_server(tmp_path, SOURCE_ALLOW_PRIVATE="true")
    try:
        result = run_blocks(
            server,
            home,
            tmp_path,
            [block],
            {
                README_DATABASE: crm.render_as_string(hide_password=False),
                "127.0.0.1:5432/crm": f"{crm.host}:{crm.port or 5432}/{crm.database}",
            },
        )
    finally:
        subprocess.run(
            ["psql", admin, "-q", "-c", f'DROP DATABASE IF EXISTS "{crm.database}" WITH (FORCE)'], timeout=60
        )
        subprocess.run(["psql", admin, "-q", "-c", "DROP ROLE IF EXISTS segments_reader"], timeout=60)
    outcomes = re.findall(r"'outcome': '(\w+)'", result.stdout)
    assert outcomes == ["activated", "held"], result.stdout
    assert "'unchanged " in result.stdout and "is below min_unchanged 0.8" in result.stdout
    assert "reader-secret" not in result.stdout  # the source's password is never shown back
    assert '"total":2' in result.stdout
