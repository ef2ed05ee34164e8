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
    """Write kmeans.pkl, scaler.pkl (unless ``scaler`` is None) and metadata.json into directory.

    Each file is written to a temporary file in the same directory, fsynced
    and moved into place with os.replace, metadata last, so a crash never
    leaves a half-written file. metadata.json records the SHA-256 of the two
    pickles, so if a crash falls between the renames :func:`read_directory`
    reports the mismatch instead of serving a mixed model.
    """
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    pickles = {KMEANS_FILE: _dump(kmeans)}
    if scaler is not None:
        pickles[SCALER_FILE] = _dump(scaler)
    metadata = dict(metadata)
    metadata["artifacts"] = {name: hashlib.sha256(payload).hexdigest() for name, payload in pickles.items()}
    files = [*pickles.items(), (METADATA_FILE, json.dumps(metadata, indent=2, sort_keys=False).encode("utf-8"))]
    staged: list[tuple[str, str]] = []
    try:
        for name, payload in files:
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
    """(kmeans, scaler, metadata) as saved by :func:`write_directory`; any problem raises ModelLoadError.

    The scaler is None for a model saved without one (a declared schema's: its encoding is learned).
    """
    source = Path(directory)
    kmeans_blob = _read(source / KMEANS_FILE)
    scaler_blob = None
    metadata_blob = _read(source / METADATA_FILE)
    try:
        metadata = json.loads(metadata_blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{METADATA_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ModelLoadError(f"{METADATA_FILE} does not hold a JSON object")
    blobs = {KMEANS_FILE: kmeans_blob}
    artifacts = metadata.pop("artifacts", None)
    # The files a save wrote are listed; a directory saved before that list is a customer model's.
    if not isinstance(artifacts, dict) or SCALER_FILE in artifacts:
        scaler_blob = blobs[SCALER_FILE] = _read(source / SCALER_FILE)
    if isinstance(artifacts, dict):
        for name, blob in blobs.items():
            expected = artifacts.get(name)
            if expected and hashlib.sha256(blob).hexdigest() != expected:
                raise ModelLoadError(f"{name} does not match {METADATA_FILE} (interrupted save or mixed versions)")
    kmeans = _undump(kmeans_blob, KMEANS_FILE)
    scaler = None if scaler_blob is None else _undump(scaler_blob, SCALER_FILE)
    return kmeans, scaler, metadata


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelLoadError(f"model file missing: {path}") from exc
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


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
