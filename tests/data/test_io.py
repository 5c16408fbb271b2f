"""mer.data.io: atomic writes (all or nothing, no temp file left), checked reads, errors that
name the path and the cause."""

from __future__ import annotations

import errno
import os
import pickle

import numpy as np
import pytest
import torch

from mer.data.io import (
    MAGIC,
    CorruptFileError,
    WriteError,
    atomic_file,
    atomic_save,
    atomic_write_json,
    atomic_write_text,
    checked_load,
    describe_write_error,
)


def test_atomic_write_replaces_whole_files_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "results.json"
    atomic_write_json(path, {"uf1": 0.5})
    atomic_write_json(path, {"uf1": 0.75}, indent=2)
    assert path.read_text() == '{\n  "uf1": 0.75\n}'
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


def test_a_failing_writer_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        atomic_write_json(path, {"x": object()})  # not serialisable: nothing written
    with pytest.raises(KeyboardInterrupt):  # e.g. Ctrl-C or SIGTERM in the middle of a write
        with atomic_file(path, "w") as f:
            f.write("half of the new")
            raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk full"),
                                         (errno.EROFS, "read-only file system"),
                                         (errno.EACCES, "permission denied")])
def test_io_errors_name_the_path_and_cause(tmp_path, monkeypatch, code, words):
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(WriteError) as err:
        atomic_write_text(tmp_path / "rounds.csv", "a,b\n")
    monkeypatch.setattr(os, "replace", real_replace)
    assert err.value.errno == code and err.value.filename == str(tmp_path / "rounds.csv")
    assert words in str(err.value) and str(tmp_path / "rounds.csv") in str(err.value)
    assert list(tmp_path.iterdir()) == []
    again = pickle.loads(pickle.dumps(err.value))  # crosses worker processes intact
    assert str(again) == str(err.value) and again.errno == code


def test_torch_runtime_errors_from_a_full_disk_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr("mer.data.io._disk_nearly_full", lambda path: True)
    err = describe_write_error(tmp_path / "x.pt", RuntimeError("basic_ios::clear: iostream error"))
    assert isinstance(err, WriteError) and "disk full" in str(err) and "x.pt" in str(err)
    assert describe_write_error(tmp_path / "x.pt", RuntimeError("shape mismatch")) is None
    assert describe_write_error(tmp_path / "x.pt", ValueError("bug")) is None


def test_checked_save_load_round_trip_and_detects_damage(tmp_path):
    state = {"round": 3, "global": [np.arange(4, dtype=np.float32)], "t": torch.ones(2)}
    atomic_save(state, tmp_path / "state.pt")
    back = checked_load(tmp_path / "state.pt")
    assert back["round"] == 3 and np.array_equal(back["global"][0], state["global"][0])
    raw = (tmp_path / "state.pt").read_bytes()
    assert raw.startswith(MAGIC)
    for name, damaged in {"truncated": raw[: len(raw) // 2], "header cut": raw[:20],
                          "flipped": raw[:-10] + bytes([raw[-10] ^ 1]) + raw[-9:]}.items():
        (tmp_path / "bad.pt").write_bytes(damaged)
        with pytest.raises(CorruptFileError, match="delete it to retry") as err:
            checked_load(tmp_path / "bad.pt", what="test state", fix="delete it to retry")
        assert f"test state {tmp_path / 'bad.pt'} is truncated or corrupt" in str(err.value), name


def test_npz_round_trip_and_files_without_header(tmp_path):
    atomic_save({"probs": np.eye(3, dtype=np.float32), "fold": "db/s1"}, tmp_path / "f.npz",
                kind="npz")
    back = checked_load(tmp_path / "f.npz", kind="npz")
    assert np.array_equal(back["probs"], np.eye(3)) and str(back["fold"]) == "db/s1"
    np.savez(tmp_path / "old.npz", probs=np.ones(2))  # written before the header existed
    assert np.array_equal(checked_load(tmp_path / "old.npz", kind="npz")["probs"], np.ones(2))
    (tmp_path / "old.npz").write_bytes((tmp_path / "old.npz").read_bytes()[:30])
    with pytest.raises(CorruptFileError, match="old.npz"):
        checked_load(tmp_path / "old.npz", kind="npz")
    with pytest.raises(FileNotFoundError):
        checked_load(tmp_path / "missing.npz", kind="npz")
