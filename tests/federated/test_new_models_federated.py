"""Issue #15 build 8: every new recogniser runs inside the federated loop and under CKKS.

Composed from the real configs (``+experiment=fed_psyau model=<name> privacy=ckks``) on SynME
tiny; one round under CKKS must give the same global model as the same round in plaintext.
"""

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from mer.data.sources import load_samples
from mer.federated.loop import FederatedRun, make_clients

CONF = str(Path(__file__).resolve().parents[2] / "conf")
NEW_MODELS = ["mfdan", "dense_attention", "mpfnet_p", "mpfnet_c"]


def _cfg(model: str, privacy: str):
    overrides = ["+experiment=fed_psyau", f"model={model}", "data.preset=tiny",
                 "federated.rounds=1", "federated.baselines=false", "federated.workers=1",
                 f"privacy={privacy}"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.privacy.min_clients = 2  # tiny has two labs
    return cfg


@pytest.mark.parametrize("model", NEW_MODELS)
def test_new_model_one_ckks_round_equals_plaintext(model):
    plain_cfg, ckks_cfg = _cfg(model, "none"), _cfg(model, "ckks")
    samples = load_samples(plain_cfg.data, plain_cfg.paths.cache_dir)
    clients = make_clients(plain_cfg, samples)
    plain = FederatedRun(plain_cfg, samples, clients)
    secure = FederatedRun(ckks_cfg, samples, clients)
    before = [w.copy() for w in plain.global_weights]
    assert plain.round(1).get("skipped") is not True
    secure.round(1)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(plain.global_weights, before))
    assert moved > 1e-6  # the round trained something
    for a, b in zip(plain.global_weights, secure.global_weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    metrics = secure.evaluate()
    assert metrics  # evaluates on every lab's test split
