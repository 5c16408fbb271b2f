"""The audit report: table and plot for settings with and without a DP bound."""

import math

from mer.experiments.privacy_audit import audit_markdown, plot_audit


def _row(name, eps, delta):
    return {"setting": name, "privacy": name, "uf1": 0.5, "uar": 0.5, "epsilon": eps,
            "delta": delta, "mia": {"auc": 0.6, "advantage": 0.2}, "server_sees": "none",
            "inversion": {"psnr": 20.0, "ssim": 0.4, "label_ok": 1.0, "random_psnr": 7.0,
                          "prior_psnr": 15.0, "prior_ssim": 0.3}}


def test_report_handles_no_dp_and_an_unbounded_epsilon(tmp_path):
    report = {"model": "ststnet", "rule": "fedavg", "rounds": 2, "clients": ["a", "b"],
              "synthetic": True,
              "settings": [_row("none", None, None), _row("dp", 3.5, 1e-5),
                           _row("dp sigma=0", math.inf, 1e-5)]}
    table = audit_markdown(report)
    assert "| none | 0.500 | 0.500 | ∞ (no DP) |" in table
    assert "| dp | 0.500 | 0.500 | 3.50 (1e-05) |" in table
    assert "SYNTHETIC" in table and "prior alone" in table
    plot_audit(report, tmp_path / "audit.png")  # sigma = 0 gives epsilon = inf: still drawn
    assert (tmp_path / "audit.png").stat().st_size > 1000


def test_late_lab_and_single_survivor_teach_the_server_nothing_beyond_the_sum():
    """The audit's secagg scenarios on four labs' [n w, n]: the late lab's masked input (held
    by the server, outside the sum) and the lone survivor's (never unmasked) reconstruct no
    better than the sum alone lets the server guess; the late-lab round still opens the
    others' exact sum, the single-survivor round opens nothing."""
    import numpy as np

    from mer.experiments.privacy_audit import secagg_scenarios

    rng = np.random.default_rng(0)
    vectors = {f"lab{i}": np.append(rng.normal(size=50) * n, n)
               for i, n in enumerate((12, 30, 7, 21))}
    out = secagg_scenarios(vectors, "lab0")
    late, alone = out["late_lab"], out["single_survivor"]
    assert late["opened"] and late["released_sum_error"] < 1e-4  # the others' exact sum
    assert not alone["opened"] and alone["released_sum_error"] is None
    for r in (late, alone):
        assert r["learned_nothing"] and r["held_error"] > 1e3  # uniform noise, not the lab
    assert alone["sum_error"] == 1.0  # nothing released: no better than guessing zeros


def test_the_report_holds_the_server_view_and_the_scenarios(tmp_path):
    from mer.experiments.privacy_audit import dp_curve_figures

    report = {"model": "ststnet", "rule": "fedavg", "rounds": 2, "clients": ["a", "b", "c"],
              "synthetic": True, "settings": [_row("none", None, None)],
              "scenarios": {"late_lab": {"target": "a", "opened": True, "held_error": 1e9,
                                         "sum_error": 1.0, "learned_nothing": True}},
              "dp_curve": None}
    table = audit_markdown(report)
    assert "| late lab | a | yes | 1e+09 | 1 | yes |" in table
    assert "| `query` | `test-database, test-subject, test-clip, test-label`" in table
    assert "audit.dp_curve=RUN_DIR" in table
    import pytest

    with pytest.raises(FileNotFoundError, match="audit.dp_curve=.*dp_curve.json"):
        dp_curve_figures(str(tmp_path), tmp_path)
