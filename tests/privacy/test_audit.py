"""The audit report: table and plot for settings with and without a DP bound."""

import math

from mer.privacy.audit import audit_markdown, plot_audit


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
