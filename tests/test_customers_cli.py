"""`python -m app run`: a file scored into the customer base from the shell."""

from __future__ import annotations

import pytest

from generate_dataset import generate
from tests.test_cli import cli_env, run  # noqa: F401 - the fixture is used by name

pytestmark = pytest.mark.slow


def test_run_scores_a_file_into_the_base_and_says_what_changed(tmp_path, cli_env):  # noqa: F811
    frame = generate(rows=600, seed=4)
    frame.to_csv(tmp_path / "customers.csv", index=False)
    trained = run(cli_env, tmp_path, "-m", "app", "train", "--k", "3")
    assert trained.returncode == 0, trained.stderr
    first = run(cli_env, tmp_path, "-m", "app", "run", "--input", str(tmp_path / "customers.csv"))
    assert first.returncode == 0, first.stderr
    assert "Run 1 completed" in first.stdout and "600 customers, 600 new" in first.stdout
    frame.iloc[:100].to_csv(tmp_path / "some.csv", index=False)
    second = run(cli_env, tmp_path, "-m", "app", "run", "--input", str(tmp_path / "some.csv"), "--mode", "upsert")
    assert second.returncode == 0, second.stderr
    assert "100 customers, 0 new, 0 changed, 100 unchanged, 0 gone" in second.stdout
    frame.iloc[:3].assign(CustomerID=1).to_csv(tmp_path / "twice.csv", index=False)
    refused = run(cli_env, tmp_path, "-m", "app", "run", "--input", str(tmp_path / "twice.csv"))
    assert refused.returncode == 2 and "more than once" in refused.stderr
    missing = run(cli_env, tmp_path, "-m", "app", "run", "--input", str(tmp_path / "nope.csv"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
