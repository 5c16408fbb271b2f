"""SynME through the real pipeline is learnable but not trivial (default preset)."""

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold

from mer.data.sources import load_samples
from mer.engine.metrics import recognition_metrics
from mer.run import CONFIG_DIR


@pytest.mark.slow
def test_default_synme_flow_is_learnable_not_trivial(tmp_path_factory):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["data=synme"])
    samples = load_samples(cfg.data, tmp_path_factory.mktemp("cache"))
    assert samples.synthetic
    assert set(samples.meta["database"]) == {"synA", "synB", "synC"}
    assert samples.meta["subject_key"].nunique() >= 25
    counts = np.bincount(samples.labels, minlength=3)
    assert (counts >= 15).all(), counts  # every composite class is represented

    x = samples.x.reshape(len(samples.x), -1)
    y, groups = samples.labels, samples.meta["subject_key"].to_numpy()
    pred = np.empty_like(y)
    for train, test in GroupKFold(n_splits=5).split(x, y, groups):
        clf = LogisticRegression(C=0.05, max_iter=2000).fit(x[train], y[train])
        pred[test] = clf.predict(x[test])
    m = recognition_metrics(y, pred, samples.class_names)
    print(f"SynME subject-disjoint logistic regression: UF1 {m['uf1']:.3f} UAR {m['uar']:.3f}")
    assert m["uf1"] > 0.45 and m["uar"] > 0.45  # chance is about 0.33
    assert m["uf1"] < 0.95  # realistic ambiguity: not a trivial task
