"""The local copy of the default segmentation's active version in models/ (kmeans.pkl, scaler.pkl).

Written atomically under an advisory file lock, so processes sharing the folder never
interleave a save; users load these files with joblib, as the README shows.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

from app.ml import METADATA_FILE, ModelLoadError, SegmentationModel

try:
    import fcntl
except ImportError:  # not on POSIX: the local copy is then written without a lock
    fcntl = None  # type: ignore[assignment]

STALE_TEMP_SECONDS = 60
LOCK_FILE = ".lock"


@contextlib.contextmanager
def directory_lock(directory: Path, *, shared: bool = False) -> Iterator[None]:
    """An advisory lock on the model folder, so processes sharing it never interleave a save."""
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(directory / LOCK_FILE, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _holds_version(directory: Path, version: str) -> bool:
    """True when `directory` holds an intact copy of `version` (a save cut short does not count)."""
    try:
        if json.loads((directory / METADATA_FILE).read_text("utf-8")).get("version") != version:
            return False
        return SegmentationModel.load(directory).version == version
    except (OSError, ValueError, AttributeError, ModelLoadError):
        return False


def load_local_copy(directory: Path) -> SegmentationModel:
    """The model in `directory`, after removing temporary files a killed save left behind."""
    with directory_lock(directory):
        cutoff = time.time() - STALE_TEMP_SECONDS
        for leftover in directory.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
        return SegmentationModel.load(directory)


def save_local_copy(model: SegmentationModel, directory: Path) -> bool:
    """Write `model` as the local copy unless it already is; True when files were written."""
    with directory_lock(directory):
        if _holds_version(directory, model.version):
            return False
        model.save(directory)
        return True
