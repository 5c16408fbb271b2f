"""Files mer writes and reads back: atomic writes, checked reads, errors that name the path.

Every write goes to a hidden temporary file next to its target (``.<name>.<random>.tmp``),
is flushed to disk and then renamed over the target, so a reader sees the old file or the new
one, never half of one; on any failure the temporary file is removed. ``OSError`` ENOSPC,
EROFS, EACCES/EPERM (and torch's ``RuntimeError`` wrapping an I/O failure) come out as a
:class:`WriteError` that names the path and says disk full / read-only / permission denied.

Files written with :func:`atomic_save` start with a header carrying the SHA-256 of their
content; :func:`checked_load` verifies it (and still reads files without the header, written
before it existed), so a truncated or bit-flipped file is a :class:`CorruptFileError` naming
the file and what to delete, never a raw zip/pickle error.

The format of a checked file::

    b"MERSUM1 " + sha256(payload) as 64 hex digits + b"\\n" + payload

where the payload is ``torch.save`` (kind ``torch``) or ``np.savez`` (kind ``npz``) bytes.

This module imports nothing of mer (data is the bottom layer): every layer may use it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

MAGIC = b"MERSUM1 "
_HEADER = len(MAGIC) + 64 + 1


class WriteError(OSError):
    """A file could not be written; the message names the path, the cause and the fix.

    ``errno`` and ``filename`` are those of the underlying error (``errno`` None when torch
    reported an I/O failure without one)."""

    def __init__(self, path: Path | str, message: str, err: int | None = None) -> None:
        super().__init__(message)
        self.errno, self.filename, self.message = err, str(path), message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # survives pickling between worker processes
        return (WriteError, (self.filename, self.message, self.errno))


class CorruptFileError(ValueError):
    """A file mer wrote cannot be read back: truncated, altered, or not what it should be."""


def describe_write_error(path: Path | str, exc: BaseException) -> WriteError | None:
    """The :class:`WriteError` for ``exc`` raised while writing ``path``; None when ``exc`` is
    not an I/O failure (a bug, which should propagate as it is)."""
    path = Path(path)
    code = getattr(exc, "errno", None)
    if isinstance(exc, RuntimeError) and not isinstance(exc, OSError):
        text = str(exc).lower()
        if not any(s in text for s in ("iostream", "no space", "file write failed",
                                       "unexpected pos", "inline_container", "read-only",
                                       "permission denied")):
            return None
        code = errno.ENOSPC if "no space" in text or _disk_nearly_full(path) else \
            errno.EROFS if "read-only" in text else \
            errno.EACCES if "permission denied" in text else None
    elif not isinstance(exc, OSError):
        return None
    reason = f"({exc})" if str(exc) else f"({type(exc).__name__})"
    if code in (errno.ENOSPC, errno.EDQUOT):
        msg = (f"disk full: could not write {path} {reason}; free space on the file system "
               f"of {path.parent} (or write elsewhere, e.g. another hydra.run.dir) and rerun; "
               "with resume=true finished work is kept")
    elif code == errno.EROFS:
        msg = (f"read-only file system: could not write {path} {reason}; choose a writable "
               "place for the outputs (hydra.run.dir=..., paths.cache_dir=...)")
    elif code in (errno.EACCES, errno.EPERM):
        msg = (f"permission denied: could not write {path} {reason}; fix the permissions of "
               f"{path.parent} or choose another place for the outputs (hydra.run.dir=...)")
    else:
        msg = f"could not write {path} {reason}; check the disk and the folder {path.parent}"
    return WriteError(path, msg, code)


def _disk_nearly_full(path: Path) -> bool:
    with contextlib.suppress(OSError):
        for folder in (path.parent, *path.parents):
            if folder.exists():
                return shutil.disk_usage(folder).free < 1 << 20
    return False


@contextlib.contextmanager
def atomic_file(path: Path | str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` for writing; on a clean exit it is flushed,
    synced and renamed over ``path``, on any error removed (I/O errors as :class:`WriteError`).

    Args:
        mode: ``"wb"`` or ``"w"`` (text, UTF-8).
    """
    path = Path(path)
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file: mode must be 'wb' or 'w', not {mode!r}")
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _sync_dir(path.parent)
    except WriteError:
        raise
    except BaseException as e:
        err = describe_write_error(path, e)
        if err is not None:
            raise err from e
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _sync_dir(folder: Path) -> None:
    """Make the rename durable (best effort: not every file system allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any, **kwargs: Any) -> None:
    """``json.dumps(obj, **kwargs)`` to ``path`` atomically (serialised before anything is
    written: an object that cannot be serialised leaves the old file as it was)."""
    atomic_write_text(path, json.dumps(obj, **kwargs))


def atomic_write_with(path: Path | str, write: Callable[[IO[bytes]], Any]) -> None:
    """``write(buffer)`` into memory, then the bytes to ``path`` atomically: for writers that
    take a file object (``DataFrame.to_csv``, ``Figure.savefig``, ``np.savez``...)."""
    buf = io.BytesIO()
    write(buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save(obj: Any, path: Path | str, kind: str = "torch") -> None:
    """Save ``obj`` with a content checksum, atomically (read it with :func:`checked_load`).

    Args:
        kind: ``torch`` (any object ``torch.save`` takes) or ``npz`` (a dict of arrays).
    """
    buf = io.BytesIO()
    if kind == "torch":
        import torch

        torch.save(obj, buf)
    elif kind == "npz":
        import numpy as np

        np.savez(buf, **obj)
    else:
        raise ValueError(f"atomic_save: kind must be 'torch' or 'npz', not {kind!r}")
    payload = buf.getvalue()
    header = MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    with atomic_file(path, "wb") as f:
        f.write(header)
        f.write(payload)


def checked_load(path: Path | str, kind: str = "torch", what: str = "file",
                 fix: str = "delete it and rerun") -> Any:
    """Read what :func:`atomic_save` wrote; a missing, truncated or altered file raises
    :class:`CorruptFileError` (``FileNotFoundError`` when absent) naming ``path`` and ``fix``.

    Args:
        kind: ``torch`` (returns the object) or ``npz`` (returns a dict of arrays).
        what: what the file is, for the message (``federated checkpoint``, ``saved fold``).
        fix: what to do about a corrupt file (``delete it to ...``).

    Files without the checksum header (written before it existed) are read unchecked.
    """
    path = Path(path)

    def corrupt(reason: str) -> CorruptFileError:
        return CorruptFileError(f"{what} {path} is truncated or corrupt ({reason}); {fix}")

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CorruptFileError(f"{what} {path} cannot be read ({e}); {fix}") from e
    if data.startswith(MAGIC):
        if len(data) < _HEADER or data[_HEADER - 1:_HEADER] != b"\n":
            raise corrupt("its checksum header is cut short")
        expected = data[len(MAGIC):_HEADER - 1].decode("ascii", "replace")
        payload = data[_HEADER:]
        actual = hashlib.sha256(payload).hexdigest()
        if actual != expected:
            raise corrupt(f"checksum mismatch: {len(payload)} bytes with sha256 "
                          f"{actual[:12]}..., written as {expected[:12]}...")
    else:
        payload = data
    try:
        if kind == "torch":
            import torch

            return torch.load(io.BytesIO(payload), weights_only=False)
        if kind == "npz":
            import numpy as np

            with np.load(io.BytesIO(payload), allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
    except Exception as e:
        raise corrupt(f"{type(e).__name__}: {e}") from e
    raise ValueError(f"checked_load: kind must be 'torch' or 'npz', not {kind!r}")
