"""On-disk cache of preprocessed samples, keyed by content and parameters.

An entry's key is ``sha256(sha256(onset bytes), sha256(apex bytes), params key, VERSION)``, so
a re-run over the same frames with the same parameters finds every entry, while changing a
frame's bytes, a parameter or the pipeline code (bump ``VERSION``) computes afresh. Paths play
no part: moving a database keeps its cache valid.

Layout: ``root/<key[:2]>/<key>.npy`` (one array) or ``<key>.npz`` (several named arrays, one
per clip of the full pipeline, :meth:`FlowCache.get_arrays`). Entries are written to a
temporary file and renamed into place, so an interrupted run never leaves a half-written entry
under a valid name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Bump whenever the preprocessing code changes what it produces for the same inputs.
VERSION = "1"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(onset_sha: str, apex_sha: str, params_key: str, version: str = VERSION) -> str:
    """Hex sha256 naming the cache entry of one (onset, apex, params) triple."""
    text = "\n".join([onset_sha, apex_sha, params_key, f"mer-preprocess-v{version}"])
    return hashlib.sha256(text.encode()).hexdigest()


class FlowCache:
    """A folder of ``.npy`` arrays addressed by :func:`cache_key`.

    ``hits`` and ``misses`` count the lookups made through this object.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        """The stored array, or None when absent (or unreadable, which is logged)."""
        path = self.path(key)
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, EOFError) as exc:  # e.g. a disk fault; recompute it
            log.warning("unreadable cache entry %s (%s); it will be recomputed", path, exc)
            self.misses += 1
            return None
        self.hits += 1
        return arr

    def put(self, key: str, arr: np.ndarray) -> None:
        """Store ``arr`` under ``key`` atomically."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.asarray(arr), allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def __contains__(self, key: str) -> bool:
        return self.path(key).exists()

    def arrays_path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def get_arrays(self, key: str) -> dict[str, np.ndarray] | None:
        """The named arrays stored under ``key``, or None when absent or unreadable."""
        path = self.arrays_path(key)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, EOFError, KeyError) as exc:
            log.warning("unreadable cache entry %s (%s); it will be recomputed", path, exc)
            self.misses += 1
            return None
        self.hits += 1
        return arrays

    def put_arrays(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        """Store named arrays under ``key`` atomically (one ``.npz``)."""
        path = self.arrays_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
