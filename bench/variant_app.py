"""The service with named middleware left out, to measure what each one costs.

    BENCH_DROP_MIDDLEWARE=ServiceMiddleware uvicorn variant_app:app --app-dir bench

Only for bench/run.py: the service itself always runs with all of its middleware.
"""

from __future__ import annotations

import os

from app.main import create_app

app = create_app()
_dropped = {name.strip() for name in os.environ.get("BENCH_DROP_MIDDLEWARE", "").split(",") if name.strip()}
_unknown = _dropped - {entry.cls.__name__ for entry in app.user_middleware}
if _unknown:
    raise SystemExit(f"no such middleware: {', '.join(sorted(_unknown))}")
app.user_middleware = [entry for entry in app.user_middleware if entry.cls.__name__ not in _dropped]
