"""``python -m mer.federated.flower_local``: bad arguments are one clear line before anything
starts (found by the reliability cases: a file as --out-dir gave NotADirectoryError, and
--clients 0 was accepted and failed after the timeout with a raw TimeoutError)."""

import re

import pytest

from mer.federated.flower_local import main


@pytest.mark.parametrize("args, message", [
    (["--clients", "0"], r"--clients 0: give at least 1 SuperNode"),
    (["--clients", "-3"], r"--clients -3: give at least 1 SuperNode"),
    (["--timeout-s", "nan"], r"--timeout-s nan: must be a number of seconds >= 0"),
    (["--worker-idle-s", "-1"], r"--worker-idle-s -1.0: must be a number of seconds >= 0"),
])
def test_bad_numbers_are_refused_before_anything_starts(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err


@pytest.mark.parametrize("flag", ["--out-dir", "--workdir"])
def test_a_file_where_a_folder_is_needed_is_named(flag, tmp_path, capsys):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as stop:
        main([flag, str(blocker / "flower")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"{blocker} is a file, not a folder" in err
    assert not (tmp_path / "flower").exists()
