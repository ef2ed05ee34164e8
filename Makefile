# Two commands do all the set-up: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
HOST   ?= 127.0.0.1
PORT   ?= 8000
WORKERS ?= 1

.PHONY: run test lint format install install-dev install-spark java browser dataset admin model bench bench-smoke clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt $(VENV)/.installed
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev browser

$(VENV)/.installed-spark: requirements-spark.txt $(VENV)/.installed
	$(PIP) install --quiet -r requirements-spark.txt
	touch $@

# Optional: Apache Spark for `--engine spark` (pyspark, and Java 17 from apt when missing and we are
# root). The service never needs it; without it tests/test_spark.py is skipped with the reason.
install-spark: $(VENV)/.installed-spark java

java:
	@if command -v java >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y openjdk-17-jre-headless) || echo "Java not installed: the Spark tests will be skipped."; \
	else \
		echo "No java (installing it needs root and apt-get): the Spark tests will be skipped."; \
	fi

# Chromium for tests/test_browser.py, from apt when missing and we are root. Never fatal:
# without it that test is skipped.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium) || echo "Chromium not installed: the browser test will be skipped."; \
	else \
		echo "No /usr/bin/chromium (installing it needs root and apt-get): the browser test will be skipped."; \
	fi

data/customers.csv: | $(VENV)/.installed
	$(PY) generate_dataset.py --out $@

dataset: data/customers.csv

admin: $(VENV)/.installed
	$(PY) create_admin.py

# Trains only when no model is there yet.
model: $(VENV)/.installed data/customers.csv
	@if [ -f models/kmeans.pkl ] && [ -f models/scaler.pkl ]; then \
		echo "Model found in models/: not retraining (python -m app train to retrain)."; \
	else \
		$(PY) -m app train --csv data/customers.csv; \
	fi

# uvloop and httptools come with uvicorn[standard]. The app logs every request itself, with its
# request id; uvicorn's access log would repeat those lines and cost about 30% of the throughput.
run: install dataset admin model
	$(VENV)/bin/uvicorn app.main:app --host $(HOST) --port $(PORT) --workers $(WORKERS) \
		--loop uvloop --http httptools --no-access-log

# pytest.ini spreads the suite over every core (pytest-xdist). With TEST_DATABASE_URL set, the tests
# marked `postgres` also run there, each xdist worker on a database of its own beside it (<name>_gw0, ...).
test: install-dev
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# What CI refuses a submission for: lint findings, unformatted code, type errors in app/.
lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Installs Debian's wrk when missing; BENCH_ARGS=--quick (and SEGMENTATION_BENCH_ARGS=--quick, RFM_BENCH_ARGS=--quick,
# VALUE_BENCH_ARGS=--quick,
# WEBHOOK_BENCH_ARGS="--messages 2000") for a short smoke run.
bench: install-dev
	$(PY) bench/run.py $(BENCH_ARGS)
	$(PY) bench/bench_segmentations.py $(SEGMENTATION_BENCH_ARGS)
	$(PY) bench/bench_rfm.py $(RFM_BENCH_ARGS)
	$(PY) bench/bench_value.py $(VALUE_BENCH_ARGS)
	$(PY) bench/bench_webhooks.py $(WEBHOOK_BENCH_ARGS)

# bench/run.py --quick end to end (every row and target printed), one run after the other; minutes
# of load generation, so not part of make test.
bench-smoke: install-dev
	$(VENV)/bin/pytest -m bench -n 0 tests/test_bench_smoke.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .coverage .coverage.* htmlcov
