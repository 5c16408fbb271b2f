"""The engine counts DPK-GAT's data prior from the training split of each fold only."""

import numpy as np
import pandas as pd
import torch

from mer.data.samples import FlowSamples
from mer.engine.au_module import AUMERModule
from mer.engine.build import build_module
from mer.engine.module import MERModule
from mer.engine.protocols import loso_folds

DPK = {"name": "dpk_gat", "lr": 1e-3, "weight_decay": 0.0, "optimizer": "adam", "kwargs": {},
       "loss": {"w_emotion": 0.2, "w_au": 0.8}, "prior": {"schedule": "decay", "ratio": 1.0}}


def samples_with_aus(aus):
    n = len(aus)
    meta = pd.DataFrame({"database": "db", "subject": [f"s{i % 3}" for i in range(n)],
                         "clip": [f"c{i}" for i in range(n)], "label": [i % 3 for i in range(n)],
                         "aus": aus, "has_aus": True})
    return FlowSamples(np.zeros((n, 3, 28, 28), np.float32), meta, ["a", "b", "c"])


def prior_of(samples, fold):
    module = build_module(DPK, samples, fold.train_idx)
    assert isinstance(module, AUMERModule)
    return module.net.data_prior.clone()


def test_data_prior_sees_training_aus_only():
    aus = [(1, 2), (4, 7), (12,), (1, 2, 12), (6, 12), (15, 17), (4,), (9, 10), (1, 4)]
    base = samples_with_aus(aus)
    fold = loso_folds(base)[0]  # test subject s0: samples 0, 3, 6
    p0 = prior_of(base, fold)
    test_changed = list(aus)
    test_changed[3] = (9, 10, 17)  # a test sample's AUs
    torch.testing.assert_close(prior_of(samples_with_aus(test_changed), fold), p0)
    train_changed = list(aus)
    train_changed[1] = (9, 10, 17)  # a training sample's AUs
    assert not torch.allclose(prior_of(samples_with_aus(train_changed), fold), p0)


def test_plain_networks_get_the_plain_module():
    model = {**DPK, "name": "ststnet"}
    module = build_module(model, samples_with_aus([(1,)] * 6), np.arange(3))
    assert type(module) is MERModule
