"""The spotting configs compose and their keys are checked before any work."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from mer.config_check import ConfigError, check_config
from mer.run import CONFIG_DIR


def _compose(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("overrides", [
    ["+experiment=spot_synme"], ["+experiment=spot_megc"], ["+experiment=spot_recognise"],
    ["+experiment=fed_spot"], ["spotting=mdmd"], ["spotting=me_tst"]])
def test_spotting_configs_pass_validation(overrides):
    cfg = _compose(overrides)
    check_config(cfg)
    assert cfg.get("spotters") or cfg.get("spotting") or cfg.get("fed_spot")


def test_spot_synme_runs_every_spotter_on_synme_lv():
    cfg = _compose(["+experiment=spot_synme"])
    assert cfg.data.kind == "synme_lv"
    assert sorted(cfg.spotters) == ["apex_score", "mdmd", "me_tst", "mesfusion"]
    assert cfg.spotters.me_tst.w_spot == 0.9 and cfg.spotters.me_tst.w_rec == 0.1


def test_bad_spotting_values_are_all_reported():
    with pytest.raises(ConfigError) as err:
        check_config(_compose(["+experiment=spot_recognise", "spotters.apex_score.epochs=0",
                               "spotters.me_tst.thresholds=[1.5,-1]", "strs.recogniser=foo"]))
    keys = sorted(p.split("=")[0] for p in err.value.problems)
    assert keys == ["spotters.apex_score.epochs", "spotters.me_tst.thresholds",
                    "strs.recogniser"]


def test_spot_megc_reads_only_the_long_video_databases():
    cfg = _compose(["+experiment=spot_megc", "data.root=/data/megc"])
    assert cfg.data.kind == "composite" and cfg.data.long_videos
    assert dict(cfg.data.roots) == {"casme_sq": "/data/megc", "samm_lv": "/data/megc"}
