"""federated.workers > 1: clients trained at once in worker processes give the run that
training them in turn gives (same seeds, same thread count), state and faults included."""

import numpy as np
import pytest
from fedtoys import fed_cfg, toy_samples
from omegaconf import OmegaConf, open_dict

from mer.federated.loop import FederatedRun, make_clients


def _run(cfg, samples):
    run = FederatedRun(cfg, samples, make_clients(cfg, samples))
    try:
        run.run_rounds()
    finally:
        run.close()
    return run


CASES = {
    "pfedprox": {"rule": {"name": "fedprox"}, "mu": 0.01, "personalise": {"own": 0.9}},
    "scaffold+crash": {"rule": {"name": "scaffold"},
                       "faults": {"crash": [{"client": "db1", "round": 1}]}},
    "dp": {"privacy": {"name": "dp", "noise_multiplier": 0.5, "max_grad_norm": 1.0,
                       "target_epsilon": None, "delta": 1e-5, "accountant": "rdp",
                       "sample_rate": None, "secure_mode": False}},
}


@pytest.mark.parametrize("case", list(CASES))
def test_workers_give_the_in_turn_run(one_thread, case):
    samples = toy_samples(learnable=True)
    federated = dict(CASES[case])
    privacy = federated.pop("privacy", None)
    runs = {}
    for workers in (1, 2):
        cfg = fed_cfg(seed=5, workers=workers, **federated)
        if privacy:
            with open_dict(cfg):
                cfg.privacy = OmegaConf.create(privacy)
        runs[workers] = _run(cfg, samples)
    turn, parallel = runs[1], runs[2]
    for a, b in zip(turn.global_weights, parallel.global_weights):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(parallel.global_weights,
                                                        parallel.initial_weights))
    assert turn.curves == parallel.curves and turn.failures == parallel.failures
    for name, state in turn.state.items():  # what the workers changed came back
        other = parallel.state[name]
        for field in ("personal", "last", "control"):
            mine, theirs = getattr(state, field), getattr(other, field)
            assert (mine is None) == (theirs is None)
            for a, b in zip(mine or [], theirs or []):
                np.testing.assert_array_equal(a, b)
    if case == "scaffold+crash":
        assert [s["failed"] for s in parallel.stats] == [["db1"], []]
    if case == "dp":
        assert turn.epsilons() == parallel.epsilons() and \
            all(v > 0 for v in parallel.epsilons()["clients"].values())
