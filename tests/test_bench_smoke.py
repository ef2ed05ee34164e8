"""`bench/run.py --quick` runs end to end and prints every row. No figure is asserted: timings belong to `make bench`.

Minutes of load generation: left out of the default run, run by `make bench-smoke` (`pytest -m bench`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import run as bench  # noqa: E402  (bench/ is not a package)

pytestmark = pytest.mark.bench

TARGET_NAMES = [
    "POST /predict ratio",
    "POST /predict p99",
    "GET /clusters ratio",
    "GET /elbow ratio",
    "GET /history?limit=50 ratio",
    "GET / p99 < 50 ms while 16 logins hash",
    "-row CSV batch < 2 s",
    "-row training < 30 s",
    "-row training peak RSS",
    "every /predict answer has its history row",
]


def _run(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done.stdout.splitlines()


def _has_row(lines: list[str], label: str) -> bool:
    return any(line.startswith(label) and len(line.split()) > len(label.split()) for line in lines)


def test_quick_bench_prints_every_row_and_target():
    lines = _run("--quick")
    labels = [
        bench.BARE_LABEL,
        *(row[0] for row in bench.ENDPOINTS),
        *(row[0] for row in bench.VARIANTS),
        bench.LOGIN_LABEL,
        bench.PROBE_LABEL,
    ]
    for label in labels:
        assert _has_row(lines, label), f"no row {label!r} in:\n" + "\n".join(lines)
    batch_rows = [line for line in lines if line.startswith(f"batch {bench.QUICK.batch_rows:,}-row CSV")]
    assert len(batch_rows) == 2, lines
    for rows in bench.QUICK.train_rows:
        assert any(line.startswith(f"train {rows:,} rows") for line in lines), lines
    targets = lines[lines.index("targets (quick mode: smaller sizes, one short round; not the real verdict)") :]
    for name in TARGET_NAMES:
        assert any(name in line and line.rstrip().endswith(("met", "MISSED")) for line in targets), (name, targets)
    assert not [line for line in lines if line.startswith("error:")]


def test_quick_bench_runs_without_wrk():
    """Where wrk cannot be installed the asyncio load generator stands in."""
    lines = _run("--quick", "--python-load", "--skip-extras", "--no-variants")
    for label in (bench.BARE_LABEL, *(row[0] for row in bench.ENDPOINTS)):
        assert _has_row(lines, label), f"no row {label!r} in:\n" + "\n".join(lines)
