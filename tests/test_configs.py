"""Every config composes: each experiment, and each option of each group."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mer.models.registry import list_models
from mer.run import CONFIG_DIR

CONF = Path(CONFIG_DIR)
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def _compose(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = _compose([f"+experiment={experiment}"])
    assert cfg.name == experiment
    assert cfg.model.name in list_models()
    assert cfg.protocol.select == "last" or cfg.protocol.val_subjects


@pytest.mark.parametrize("group", ["data", "model", "protocol", "trainer", "logger", "privacy"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        cfg = _compose([f"{group}={option}"])
        assert cfg[group] is not None


def test_megc2019_uses_the_reference_recipe():
    cfg = _compose(["+experiment=megc2019_ststnet"])
    assert (cfg.model.lr, cfg.data.batch_size, cfg.data.shuffle, cfg.trainer.max_epochs) == \
        (5e-5, 256, False, 800)
    assert cfg.data.kind == "flowcache" and cfg.protocol.select == "last"


def test_every_model_config_names_a_registered_model():
    for path in (CONF / "model").glob("*.yaml"):
        assert _compose([f"model={path.stem}"]).model.name in list_models()
