"""Issue 13, build 3 in-process: under secagg / ckks the AU counts and the test results reach
the server only as protected sums, with the same figures as the plaintext run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedtoys import fed_cfg, toy_samples
from omegaconf import OmegaConf, open_dict

from mer.engine.metrics import recognition_metrics
from mer.federated.loop import FederatedRun
from mer.federated.partition import natural_clients
from mer.privacy.pooled import confusion_metrics

SCHEMES = {"secagg": {"name": "secagg"}, "ckks": {"name": "ckks", "chunk_size": 4096}}


def _cfg(privacy: dict | None, model: str = "ststnet"):
    cfg = fed_cfg(seed=5)
    with open_dict(cfg):
        cfg.model.name = model
        if privacy:
            cfg.privacy = OmegaConf.create(privacy)
    return cfg


def _samples():
    s = toy_samples(n_db=3, n_subjects=4, per_subject=3, learnable=True)
    rng = np.random.default_rng(1)
    s.meta["aus"] = [tuple(int(a) for a in rng.choice([1, 2, 4, 12, 14], 2, False))
                     for _ in range(len(s.meta))]
    s.meta["has_aus"] = True
    return s


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_secure_evaluation_gives_the_plaintext_pooled_figures_and_nothing_per_lab(
        scheme, monkeypatch):
    s = _samples()
    clients = natural_clients(s, seed=0)
    plain = FederatedRun(_cfg(None), s, clients)
    plain.round(1)
    secure = FederatedRun(_cfg(SCHEMES[scheme]), s, clients)
    secure.global_weights = plain.global_weights  # the same model scored both ways
    for c in clients:
        secure.state[c.name].personal = plain.state[c.name].personal
    sums = []
    real = type(secure.secure).sum_vectors
    monkeypatch.setattr(type(secure.secure), "sum_vectors",
                        lambda self, rnd, v: sums.append(dict(v)) or real(self, rnd, v))
    want, got = plain.evaluate(with_predictions=True), secure.evaluate(with_predictions=True)
    for kind in ("pooled_global", "pooled_personalised"):
        assert got[kind] == want[kind]
    assert got["per_client"] == {} and got["predictions"]["index"] == []
    assert got["secure_evaluation"]["labs"] == 3
    # each lab sent only its own confusion matrices (global, personalised), protected
    (vectors,) = sums
    for c in clients:
        y = s.labels[c.test_idx]
        pred = np.asarray(want["predictions"]["pred"]["global"])[
            np.isin(want["predictions"]["index"], c.test_idx)]
        cm = recognition_metrics(y, pred, s.class_names)["confusion_matrix"]
        np.testing.assert_array_equal(vectors[c.name].reshape(2, 3, 3)[0], cm)


def test_per_lab_results_in_process_only_when_disclosed():
    s = _samples()
    clients = natural_clients(s, seed=0)
    plain = FederatedRun(_cfg(None), s, clients)
    secure = FederatedRun(_cfg({"name": "secagg", "disclose_per_lab": True}), s, clients)
    want, got = plain.evaluate(), secure.evaluate()
    assert got["per_client"] == want["per_client"] and got["secure_evaluation"][
        "per_lab_disclosed"]


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_au_counts_are_summed_securely_into_the_same_prior(scheme, monkeypatch):
    """DPK-GAT: the secure sum of the labs' AU counts gives the plaintext prior exactly."""
    from mer.privacy.base import SecureAggregation

    s = _samples()
    clients = natural_clients(s, seed=0)
    seen = []
    real = SecureAggregation.sum_vectors
    monkeypatch.setattr(SecureAggregation, "sum_vectors",
                        lambda self, rnd, v: seen.append(dict(v)) or real(self, rnd, v))
    plain = FederatedRun(_cfg(None, "dpk_gat"), s, clients)
    secure = FederatedRun(_cfg(SCHEMES[scheme], "dpk_gat"), s, clients)
    assert len(seen) == 1 and set(seen[0]) == {"db0", "db1", "db2"}
    i = plain.entry_names.index("data_prior")
    assert plain.initial_weights[i].sum() > 0
    for a, b in zip(plain.initial_weights, secure.initial_weights):
        np.testing.assert_array_equal(a, b)


def test_confusion_metrics_equal_recognition_metrics_on_random_predictions():
    rng = np.random.default_rng(3)
    for _ in range(20):
        k = int(rng.integers(2, 6))
        y, p = rng.integers(0, k, 30), rng.integers(0, k, 30)
        y[y == k - 1] = 0  # a class absent from the labels
        m = recognition_metrics(y, p, [str(i) for i in range(k)])
        assert confusion_metrics(np.asarray(m["confusion_matrix"], float) + 1e-7) == \
            {key: m[key] for key in ("n", "uf1", "uar", "accuracy")}


def test_an_old_config_with_min_survivors_names_the_new_key():
    """``privacy.min_survivors`` was renamed: the privacy layer and the config check both
    say so (before: a bare TypeError from the dataclass)."""
    from mer.config_check import ConfigError, config_problems
    from mer.privacy import from_config

    with pytest.raises(ConfigError, match=r"privacy.min_survivors=3.*renamed "
                       r"privacy.min_clients.*privacy.min_clients=3"):
        from_config({"name": "secagg", "min_survivors": 3})
    problems = config_problems({"privacy": {"name": "ckks", "min_survivors": 2}})
    assert any("replace privacy.min_survivors=2 with privacy.min_clients=2" in p
               for p in problems)


def test_readme_holds_the_table_of_what_the_server_sees():
    from mer.privacy.exposure import FIELDS, markdown_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown_table() in readme
    assert {kind for kind, *_ in FIELDS} >= {"query", "train", "evaluate",
                                             "query.secure_counts", "query.secure_keys",
                                             "query.secure_shares", "query.secure_unmask",
                                             "query.secure_finish"}
