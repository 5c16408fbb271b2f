"""On-disk cache of preprocessed samples, keyed by content and parameters.

An entry's key is ``sha256(sha256(onset bytes), sha256(apex bytes), params key, VERSION)``, so
a re-run over the same frames with the same parameters finds every entry, while changing a
frame's bytes, a parameter or the pipeline code (bump ``VERSION``) computes afresh. Paths play
no part: moving a database keeps its cache valid.

Layout: ``root/<key[:2]>/<key>.npz``, one file per entry holding its named arrays (one array
``array`` for :meth:`FlowCache.put`, one per output of a clip of the full pipeline for
:meth:`FlowCache.put_arrays`) and ``__sha256__``, the :func:`content_sha256` of the key and
those arrays. Reading verifies it: an entry changed after it was written (replaced by another
entry or by other arrays, truncated, damaged) is a :class:`CacheError` naming the file to
delete, never used. Entries are written to a temporary file and renamed into place
(``os.replace``), so an interrupted run never leaves a half-written entry under a valid name;
a full disk is a :class:`CacheError` naming the entry, and :meth:`FlowCache.check_writable`
lets a caller refuse a read-only cache before computing anything.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Bump whenever the preprocessing code changes what it produces for the same inputs.
VERSION = "2"  # 2: entries are .npz files carrying their content hash
HASH_NAME = "__sha256__"
_ARRAY = "array"


class CacheError(Exception):
    """A cache entry or folder cannot be used; the message names the file and the fix."""


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


def content_sha256(key: str, arrays: dict[str, np.ndarray]) -> str:
    """Hex sha256 of an entry: its key and each array's name, dtype, shape and bytes.

    The key is part of it, so a valid entry copied under another key does not verify.
    """
    digest = hashlib.sha256(f"mer-cache-entry\n{key}\n".encode())
    for name in sorted(arrays):
        arr = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}\n{arr.dtype.str}\n{arr.shape}\n".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


class FlowCache:
    """A folder of cache entries addressed by :func:`cache_key`.

    ``hits`` and ``misses`` count the lookups made through this object.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        """The file of the entry ``key`` (one ``.npz`` per entry, whichever way it was put)."""
        return self.root / key[:2] / f"{key}.npz"

    arrays_path = path

    def __contains__(self, key: str) -> bool:
        return self.path(key).exists()

    # ------------------------------------------------------------------------ reading

    def get(self, key: str) -> np.ndarray | None:
        """The array stored by :meth:`put`, or None when absent.

        Raises:
            CacheError: the entry does not verify against its content hash (changed,
                truncated or damaged), holds no single array, or holds NaN/inf.
        """
        arrays = self.get_arrays(key, finite=(_ARRAY,))
        if arrays is None:
            return None
        if set(arrays) != {_ARRAY}:
            raise CacheError(f"cache entry {self.path(key)} holds {sorted(arrays)}, not one "
                             f"flow image; delete it (it is recomputed on the next run)")
        return arrays[_ARRAY]

    def get_arrays(self, key: str, finite: tuple[str, ...] = ()) -> dict[str, np.ndarray] | None:
        """The named arrays stored under ``key``, or None when absent.

        Args:
            key: the entry's :func:`cache_key`.
            finite: names of arrays that must hold no NaN/inf where present (e.g. the flow
                images; the landmarks of a clip without a detector are NaN on purpose).

        Raises:
            CacheError: the entry is unreadable, lacks its content hash or does not match it,
                or an array named in ``finite`` holds NaN/inf; the message names the file.
        """
        path = self.path(key)
        fix = "delete it (it is recomputed on the next run)"
        try:
            loaded = np.load(path, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):  # e.g. a bare .npy array
                raise CacheError(f"cache entry {path} is a bare array, not an entry this cache "
                                 f"wrote (no content hash); {fix}")
            with loaded as z:
                arrays = {name: z[name] for name in z.files}
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            raise CacheError(f"cache entry {path} is truncated or damaged "
                             f"({type(exc).__name__}: {exc}); {fix}") from exc
        stored = arrays.pop(HASH_NAME, None)
        if stored is None or str(stored) != content_sha256(key, arrays):
            what = "has no content hash" if stored is None else \
                "does not match its content hash"
            raise CacheError(f"cache entry {path} {what}: it was changed after it was written "
                             f"(replaced by another entry or other arrays, or damaged); {fix}")
        for name in finite:
            arr = arrays.get(name)
            if arr is not None and np.issubdtype(arr.dtype, np.floating) \
                    and not np.isfinite(arr).all():
                raise CacheError(f"cache entry {path}: '{name}' holds non-finite values (NaN or "
                                 f"inf), which would spread into every prediction; {fix}")
        self.hits += 1
        return arrays

    # ------------------------------------------------------------------------ writing

    def check_writable(self) -> None:
        """Raise CacheError, naming the folder, unless entries can be created in ``root``.

        Call it before computing what will be stored, so a read-only cache fails at once.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".writable.", suffix=".tmp", dir=self.root)
            os.close(fd)
            Path(tmp).unlink()
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise CacheError(f"cache folder {self.root}: the disk is full; free space on "
                                 "it or move the cache (MER_CACHE_DIR / paths.cache_dir)") from exc
            raise CacheError(f"cache folder {self.root} is not writable ({exc.strerror or exc}); "
                             "new entries must be computed and stored there: make it writable "
                             "or point the cache elsewhere (MER_CACHE_DIR / paths.cache_dir)"
                             ) from exc

    def put(self, key: str, arr: np.ndarray) -> None:
        """Store one array under ``key`` atomically, with its content hash."""
        self.put_arrays(key, {_ARRAY: arr})

    def put_arrays(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        """Store named arrays under ``key`` atomically (one ``.npz`` with its content hash).

        Raises:
            CacheError: the disk is full (the entry is named; nothing is left behind).
        """
        if HASH_NAME in arrays:
            raise ValueError(f"'{HASH_NAME}' is reserved for the content hash")
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        path = self.path(key)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays, **{HASH_NAME: np.array(content_sha256(key, arrays))})
            os.replace(tmp, path)
        except BaseException as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise CacheError(f"cannot write cache entry {path}: the disk is full; free space "
                                 "on it or move the cache (MER_CACHE_DIR / paths.cache_dir), "
                                 "then run again (finished entries are kept)") from exc
            raise
