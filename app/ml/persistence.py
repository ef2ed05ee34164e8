"""Saving and loading model artifacts: a directory of files, or one blob.

A directory holds kmeans.pkl and scaler.pkl (the plain scikit-learn
estimators, joblib-pickled) and metadata.json; the blob holds the same three
in one joblib payload. Only raw parts go in and out here; checking that they
make a model is :class:`app.ml.estimator.SegmentationModel`'s business.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import joblib

KMEANS_FILE = "kmeans.pkl"
SCALER_FILE = "scaler.pkl"
METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1


class ModelLoadError(Exception):
    """A saved model is missing, unreadable, corrupt or inconsistent."""


def write_directory(directory: str | os.PathLike, kmeans: Any, scaler: Any, metadata: dict[str, Any]) -> Path:
    """Write kmeans.pkl, scaler.pkl and metadata.json into directory.

    Each file is written to a temporary file in the same directory, fsynced
    and moved into place with os.replace, metadata last, so a crash never
    leaves a half-written file. metadata.json records the SHA-256 of the two
    pickles, so if a crash falls between the renames :func:`read_directory`
    reports the mismatch instead of serving a mixed model.
    """
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    kmeans_bytes = _dump(kmeans)
    scaler_bytes = _dump(scaler)
    metadata = dict(metadata)
    metadata["artifacts"] = {
        KMEANS_FILE: hashlib.sha256(kmeans_bytes).hexdigest(),
        SCALER_FILE: hashlib.sha256(scaler_bytes).hexdigest(),
    }
    metadata_bytes = json.dumps(metadata, indent=2, sort_keys=False).encode("utf-8")
    staged: list[tuple[str, str]] = []
    try:
        for name, payload in (
            (KMEANS_FILE, kmeans_bytes),
            (SCALER_FILE, scaler_bytes),
            (METADATA_FILE, metadata_bytes),
        ):
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=target)
            staged.append((tmp, name))
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, name in staged:
            os.replace(tmp, target / name)
        staged = []
        _fsync_dir(target)
    finally:
        for tmp, _ in staged:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return target


def read_directory(directory: str | os.PathLike) -> tuple[Any, Any, Any]:
    """(kmeans, scaler, metadata) as saved by :func:`write_directory`; any problem raises ModelLoadError."""
    source = Path(directory)
    blobs: dict[str, bytes] = {}
    for name in (KMEANS_FILE, SCALER_FILE, METADATA_FILE):
        try:
            blobs[name] = (source / name).read_bytes()
        except FileNotFoundError as exc:
            raise ModelLoadError(f"model file missing: {source / name}") from exc
        except OSError as exc:
            raise ModelLoadError(f"cannot read {source / name}: {exc}") from exc
    try:
        metadata = json.loads(blobs[METADATA_FILE].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{METADATA_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ModelLoadError(f"{METADATA_FILE} does not hold a JSON object")
    artifacts = metadata.pop("artifacts", None)
    if isinstance(artifacts, dict):
        for name in (KMEANS_FILE, SCALER_FILE):
            expected = artifacts.get(name)
            if expected and hashlib.sha256(blobs[name]).hexdigest() != expected:
                raise ModelLoadError(f"{name} does not match {METADATA_FILE} (interrupted save or mixed versions)")
    return _undump(blobs[KMEANS_FILE], KMEANS_FILE), _undump(blobs[SCALER_FILE], SCALER_FILE), metadata


def to_bytes(kmeans: Any, scaler: Any, metadata: dict[str, Any]) -> bytes:
    """The whole model (both estimators and metadata) as one blob."""
    buffer = io.BytesIO()
    joblib.dump(
        {"format_version": FORMAT_VERSION, "kmeans": kmeans, "scaler": scaler, "metadata": metadata},
        buffer,
        compress=3,
    )
    return buffer.getvalue()


def from_bytes(blob: bytes) -> tuple[Any, Any, Any]:
    """(kmeans, scaler, metadata) from :func:`to_bytes`; any problem raises ModelLoadError."""
    payload = _undump(blob, "model blob")
    if not isinstance(payload, dict) or not {"kmeans", "scaler", "metadata"} <= payload.keys():
        raise ModelLoadError("model blob does not hold a segmentation model")
    return payload["kmeans"], payload["scaler"], payload["metadata"]


def _dump(obj: Any) -> bytes:
    buffer = io.BytesIO()
    joblib.dump(obj, buffer)
    return buffer.getvalue()


def _undump(blob: bytes, what: str) -> Any:
    try:
        return joblib.load(io.BytesIO(blob))
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - unpickling corrupt data can raise anything
        raise ModelLoadError(f"{what} is corrupt or unreadable: {type(exc).__name__}: {exc}") from exc


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
