"""``+experiment=sticker_audit`` end to end on SynME tiny: outputs, one query per clip."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from mer.config_check import check_config
from mer.run import CONFIG_DIR, run


@pytest.mark.slow
def test_the_sticker_audit_runs_on_tiny_synme_with_one_query_per_clip(tmp_path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[
            "+experiment=sticker_audit", "data.preset=tiny", "trainer.max_epochs=2",
            "sticker_audit.areas=[0.03,0.06]", "sticker_audit.workers=0",
            "sticker_audit.styles=[{name: red_star, shape: star, colour: [40, 40, 220]}]",
            "sticker_audit.recognisers.2.kwargs.dim=16",
            "sticker_audit.recognisers.2.kwargs.block_repeats=[1,1,1]",
            "sticker_audit.bootstrap=50", "sticker_audit.figure_clips=2", "progress=false"])
    check_config(cfg)
    headline = run(cfg, tmp_path)
    assert 0.0 <= headline <= 1.0
    for name in ("sticker_audit.json", "sticker_audit.md", "attacks.csv", "success.png",
                 "stickered_frames.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert not list(tmp_path.glob("stickers-*"))  # the stickered frames are cleaned up
    report = json.loads((tmp_path / "sticker_audit.json").read_text())
    assert report["synthetic"] is True
    assert "synthetic (SynME)" in (tmp_path / "sticker_audit.md").read_text()
    roles = report["data"]["roles"]
    n_ref, n_test = roles["reference"]["clips"], roles["test"]["clips"]
    assert [r["name"] for r in report["recognisers"]] == ["ststnet", "dpk_gat", "htnet"]
    for r in report["recognisers"]:
        q = r["queries"]
        assert q["attacks"] == 1 * 2 * 3  # styles x areas x placements
        assert q["total"] == n_ref + q["attacks"] * n_test  # one query per clip and attack
        assert q["max_per_clip_and_attack"] == 1
    table = pd.read_csv(tmp_path / "attacks.csv")
    assert len(table) == 3 * 1 * 2 * 3 * n_test
    # the random draws are the same for every recogniser; causal uses one site per recogniser
    random = table[table["placement"] == "random"].groupby(["area", "clip"])["site"].nunique()
    assert (random == 1).all()
    causal = table[table["placement"] == "causal"]
    for r in report["recognisers"]:
        assert set(causal[causal["recogniser"] == r["name"]]["site"]) == {r["causal"]["order"][0]}
    for row in report["rows"]:
        assert 0.0 <= row["success"] <= 1.0 and row["n"] == n_test
    before = {(r["recogniser"], r["placement"]): r["uf1_before"] for r in report["rows"]}
    for rec in ("ststnet", "dpk_gat", "htnet"):
        assert len({v for (k, _), v in before.items() if k == rec}) == 1
    assert [c["area"] for c in report["comparisons"]] == [0.03, 0.06]
    assert "causal_minus_random" in report["comparisons"][0] and report["verdict"]
