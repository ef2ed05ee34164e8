"""Fitting in a child process: the server keeps its event loop and its GIL for requests.

A training that passes `train_timeout_seconds` is killed rather than left running, and the
child ends when its parent dies, so a killed server leaves no orphan behind.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from typing import Any

from starlette.concurrency import run_in_threadpool

from app.core.errors import AppError
from app.ml import SegmentationModel
from app.ml.preprocess import DataValidationError

_TrainingContext = multiprocessing.context.ForkServerContext | multiprocessing.context.SpawnContext
_context: _TrainingContext | None = None


class TrainingTimeout(AppError):
    """The request asked for more work than TRAIN_TIMEOUT_SECONDS allows: a client error, not an outage."""

    status_code = 422

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"Training did not finish within {seconds:g} seconds (TRAIN_TIMEOUT_SECONDS) and was "
            "stopped; the active model is unchanged. Train on fewer rows or with a fixed n_clusters."
        )


def _training_context() -> _TrainingContext:
    """A fork server with the ML stack imported once, so each training starts in milliseconds."""
    global _context
    if _context is None:
        context: _TrainingContext
        if "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["app.versions.fitting"])
        else:
            context = multiprocessing.get_context("spawn")
        _context = context
    return _context


def _exit_when_parent_dies(conn) -> None:
    # The parent never writes: EOF here means it is gone (or gave up on this training).
    try:
        conn.recv_bytes()
    except (EOFError, OSError):
        pass
    os._exit(1)


def _fit_in_child(
    conn, data: Any, schema: dict[str, Any] | None, n_clusters: int | None, random_state: int, version: str
) -> None:
    threading.Thread(target=_exit_when_parent_dies, args=(conn,), daemon=True).start()
    try:
        model = SegmentationModel.train(
            data, **_schema_argument(schema), n_clusters=n_clusters, random_state=random_state
        )
        model.version = version
        message: tuple = ("ok", model.to_bytes())
    except DataValidationError as exc:
        message = ("invalid", exc.message, exc.problems, exc.offending_rows)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which logs it
        message = ("error", f"{type(exc).__name__}: {exc}")
    conn.send(message)
    conn.close()


def _schema_argument(schema: dict[str, Any] | None) -> dict[str, Any]:
    if schema is None:
        return {}
    from app.ml.schema import FeatureSchema

    return {"schema": FeatureSchema.from_dict(schema)}


async def _wait_readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def fit_in_subprocess(
    data: Any,
    *,
    schema: dict[str, Any] | None = None,
    n_clusters: int | None,
    random_state: int,
    version: str,
    time_limit: float,
) -> tuple[SegmentationModel, bytes]:
    """Train in a child process; return the model and its artifact blob. Killed after `time_limit` seconds.

    `data` is the customer feature matrix, or for a declared schema (`schema`, a
    FeatureSchema.to_dict()) the training frame read from the upload, or for
    the RFM table of the uploaded log (an app.ml.rfm.RfmTable, no schema).
    """
    context = _training_context()
    parent_end, child_end = context.Pipe()
    process = context.Process(
        target=_fit_in_child,
        args=(child_end, data, schema, n_clusters, random_state, version),
        name="segmentation-training",
        daemon=True,
    )
    try:
        await run_in_threadpool(process.start)
        child_end.close()
        try:
            await asyncio.wait_for(_wait_readable(parent_end.fileno()), time_limit)
        except TimeoutError:
            raise TrainingTimeout(time_limit) from None
        try:
            message = await run_in_threadpool(parent_end.recv)
        except (EOFError, OSError):
            await run_in_threadpool(process.join, 5)
            raise RuntimeError(f"the training process ended without a result (exit code {process.exitcode})")
    finally:
        parent_end.close()
        if process.is_alive():
            process.kill()
        if process.pid is not None:
            await run_in_threadpool(process.join, 5)
    if message[0] == "invalid":
        raise DataValidationError(message[1], message[2], message[3])
    if message[0] != "ok":
        raise RuntimeError(f"training failed: {message[1]}")
    blob = message[1]
    return await run_in_threadpool(SegmentationModel.from_bytes, blob), blob
