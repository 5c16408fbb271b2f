"""``python -m mer.privacy.keys``: bad arguments are argparse errors naming the option and what
is allowed (exit 2, no traceback); existing key files are never replaced silently."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mer.privacy import keys
from mer.privacy.encrypted import PUBLIC_FILE, SECRET_FILE


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        keys.main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_out_is_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = _refused(["--out", str(afile)], capsys)
    assert f"--out {afile} is a file" in err
    assert afile.read_text() == "x"


@pytest.mark.parametrize("degree", ["1000", "0", "65536"])
def test_poly_modulus_degree_outside_the_choices(tmp_path, capsys, degree):
    err = _refused(["--out", str(tmp_path / "k"), "--poly-modulus-degree", degree], capsys)
    assert "--poly-modulus-degree" in err and "invalid choice" in err and "8192" in err
    assert not (tmp_path / "k").exists()


def test_coefficient_modulus_too_large_for_the_degree(tmp_path, capsys):
    """SEAL allows at most 109 bits of coefficient modulus at N=4096 (128-bit security)."""
    err = _refused(["--out", str(tmp_path / "k"), "--poly-modulus-degree", "4096",
                    "--coeff-mod-bit-sizes", "60", "60"], capsys)
    assert "120 bits" in err and "109" in err and "--poly-modulus-degree 4096" in err
    err = _refused(["--out", str(tmp_path / "k"), "--coeff-mod-bit-sizes", "70", "60"], capsys)
    assert "--coeff-mod-bit-sizes" in err and "70" in err
    err = _refused(["--out", str(tmp_path / "k"), "--scale-bits", "60"], capsys)
    assert "--scale-bits 60" in err
    assert not (tmp_path / "k").exists()


def test_existing_keys_are_not_replaced_without_force(tmp_path, capsys):
    keys.main(["--out", str(tmp_path)])
    before = (tmp_path / SECRET_FILE).read_bytes()
    capsys.readouterr()
    err = _refused(["--out", str(tmp_path)], capsys)
    assert str(tmp_path / SECRET_FILE) in err and "--force" in err
    assert (tmp_path / SECRET_FILE).read_bytes() == before
    keys.main(["--out", str(tmp_path), "--force"])
    assert (tmp_path / SECRET_FILE).read_bytes() != before
    assert (tmp_path / PUBLIC_FILE).exists()


def test_command_line_shows_no_traceback(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "mer.privacy.keys", "--out", str(afile)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(afile) in proc.stderr


def test_key_file_errors_are_mers_own(tmp_path):
    """A run given a missing, truncated or wrong-role key file: the error is mer's own (the
    entry point prints it as `mer: ...`, exit 2), naming the file; it used to be a builtin
    FileNotFoundError/ValueError/PermissionError, shown with a traceback."""
    from mer.cli import is_user_error
    from mer.privacy.encrypted import load_context

    keys.main(["--out", str(tmp_path)])
    secret, public = tmp_path / SECRET_FILE, tmp_path / PUBLIC_FILE
    cut = tmp_path / "cut.ctx"
    cut.write_bytes(secret.read_bytes()[:1000])
    cases = [(tmp_path / "nowhere.ctx", True), (public, True), (cut, True), (cut, False),
             (secret, False)]
    for path, private in cases:
        with pytest.raises(Exception) as err:
            load_context(path, private=private)
        assert is_user_error(err.value), (path, private, repr(err.value))
        assert str(path) in str(err.value)
