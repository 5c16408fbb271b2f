"""Federated spotting through mer's federated loop (``SpotTask``): the same global spotter as
the former hand-rolled FedAvg, secure aggregation equal to plaintext, FedBN keeping a lab's
batch-norm statistics, the server's view under secure aggregation, refused configs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from mer.config_rules import ConfigError
from mer.experiments.fed_spot import baseline, lab_splits
from mer.federated import aggregators
from mer.federated.loop import FederatedRun
from mer.spotting.base import split_subjects
from mer.spotting.federated import SpotTask
from mer.spotting.registry import create_spotter

torch.set_num_threads(1)

APEX = {"name": "apex_score", "window": 32, "batch_size": 8,
        "net": {"hidden": 8, "dilations": [1, 2], "dropout": 0.1}}
MESFUSION = {"name": "mesfusion", "window": 16, "batch_size": 8, "target_fps": 10,
             "net": {"image_size": 16, "channels": 4, "levels": 1, "layers": 1, "heads": 2,
                     "dropout": 0.0}}


def _splits(standin):
    videos = standin(3, 12.0) + standin(3, 6.0, {"samm_lv": 200.0}, seed=2)
    return lab_splits(videos, 0.3, seed=0)


def _cfg(rule: str = "fedavg", privacy: dict | None = None, rounds: int = 2, **fed):
    federated = {"rule": {"name": rule}, "mu": 0.0, "personalise": None,
                 "server_opt": {"name": "sgd", "lr": 1.0, "momentum": 0.0},
                 "rounds": rounds, "eval_every": rounds, "local_epochs": 1, "fraction": 1.0,
                 "min_clients": 1, "faults": {}, "num_clients": None, "baselines": False,
                 "partition": {"kind": "natural", "test_fraction": 0.3}}
    federated.update(fed)
    return OmegaConf.create({"seed": 0, "resume": False, "federated": federated,
                             "privacy": privacy})


def _run(standin, spotter=APEX, rule="fedavg", privacy=None, rounds=2, splits=None, **fed):
    task = SpotTask(spotter, splits or _splits(standin), seed=0)
    run = FederatedRun(_cfg(rule, privacy, rounds, **fed), None, task.clients, task=task)
    return run, task


def _reference_fedavg(spotter_cfg: dict, splits: dict, rounds: int, local_epochs: int,
                      seed: int) -> list[np.ndarray]:
    """The former ``fed_spot.federated_spotter`` (hand-rolled FedAvg), written again here:
    every lab builds the network from the same seed on its fit videos, the server starts
    from the position-weighted mean; each round every lab loads the global weights, trains
    ``local_epochs`` (seed: the loop's per-client seed), and the server takes the
    window-weighted mean."""
    labs = {}
    for db, (train, _) in splits.items():
        sp = create_spotter(spotter_cfg, seed=seed)
        fit, _ = split_subjects([sp.prepare(v) for v in train], sp.val_subjects, seed)
        torch.manual_seed(seed)
        sp.setup(fit)
        labs[db] = (sp, fit)

    def weights(sp):
        return [v.detach().cpu().numpy().copy() for v in sp.module.net.state_dict().values()]

    def load(sp, w):
        state = sp.module.net.state_dict()
        sp.module.net.load_state_dict({k: torch.as_tensor(a).to(v.dtype).reshape(v.shape)
                                       for (k, v), a in zip(state.items(), w)})

    global_w = aggregators.fedavg([(weights(sp), sum(v.length for v in fit))
                                   for sp, fit in labs.values()])
    for r in range(1, rounds + 1):
        results = []
        for k, (sp, fit) in enumerate(labs.values()):
            load(sp, global_w)
            summary = sp.train_epochs(fit, local_epochs, seed=seed * 100_003 + r * 101 + k)
            results.append((weights(sp), int(summary["windows"])))
        global_w = aggregators.fedavg(results)
    return global_w


def test_the_loop_trains_the_spotter_the_hand_rolled_fedavg_did(standin):
    splits = _splits(standin)
    run, task = _run(standin, splits=splits)
    run.run_rounds()
    expected = _reference_fedavg(APEX, splits, rounds=2, local_epochs=1, seed=0)
    assert len(run.global_weights) == len(expected)
    for got, want in zip(run.global_weights, expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert not np.allclose(run.global_weights[1], run.initial_weights[1])  # it trained
    # the thresholds came from the summed validation counts; figures are MEGC counts
    final = run.curves[-1]
    assert set(final["thresholds"]["global"]) == {"micro", "macro"}
    pooled = final["pooled_global"]
    per_lab = [final["per_client"][db]["global"] for db in splits]
    for scope in ("micro", "macro", "all"):  # pooled = sum of the labs' counts
        for key in ("tp", "n_pred", "n_gt"):
            assert pooled[scope][key] == sum(t[scope][key] for t in per_lab)
    assert pooled["all"]["n_gt"] == sum(len(v.gt) for _, test in splits.values() for v in test)


@pytest.mark.parametrize("scheme", ["secagg", "ckks"])
def test_secure_aggregation_gives_the_plaintext_global_spotter(standin, scheme):
    splits = _splits(standin)
    plain, _ = _run(standin, splits=splits, rounds=1)
    plain.run_rounds()
    secure, _ = _run(standin, splits=splits, rounds=1,
                     privacy={"name": scheme, "min_clients": 2})
    secure.run_rounds()
    for a, b in zip(plain.initial_weights, secure.initial_weights):  # the set-up sum too
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    for a, b in zip(plain.global_weights, secure.global_weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    p, s = plain.curves[-1], secure.curves[-1]
    assert p["thresholds"] == s["thresholds"] and p["pooled_global"] == s["pooled_global"]
    assert s["per_client"] == {} and p["per_client"]  # per-lab tables: in the clear only


def test_fedbn_keeps_each_labs_batch_norm_statistics_local(standin):
    """MESFusion's flow stem and MFEM have BatchNorm: under FedAvg every lab starts each round
    from the same model, under FedBN from the global one with its own BN entries."""
    splits = _splits(standin)
    runs = {}
    for rule in ("fedavg", "fedbn"):
        run, task = _run(standin, spotter=MESFUSION, rule=rule, splits=splits)
        for rnd in (1, 2):
            run.round(rnd)
        runs[rule] = run
    mask = runs["fedbn"].bn_mask
    names = runs["fedbn"].entry_names
    assert any(mask) and any("running_var" in n for n, m in zip(names, mask) if m)
    a, b = (runs["fedbn"]._for_client(runs["fedbn"].global_weights, db) for db in splits)
    for name, m, wa, wb, g, last_a in zip(names, mask, a, b, runs["fedbn"].global_weights,
                                          runs["fedbn"].state["casme_sq"].last):
        if m:  # the lab's own statistics, not the mean
            np.testing.assert_array_equal(wa, last_a)
            if "running_mean" in name:
                assert not np.allclose(wa, wb), name
        else:
            np.testing.assert_array_equal(wa, g)
            np.testing.assert_array_equal(wb, g)
    fedavg = runs["fedavg"]
    for db in splits:
        for w, g in zip(fedavg._for_client(fedavg.global_weights, db), fedavg.global_weights):
            np.testing.assert_array_equal(w, g)


def _server_view(standin, splits, monkeypatch) -> tuple[dict, dict]:
    """One round and the evaluation under secagg; the server's view: every payload it added
    (must be bytes), every sum it opened, the released figures and the global model."""
    from mer.privacy.secagg import MaskedAggregation

    opened, payload_types = [], set()
    real_sum, real_decode = MaskedAggregation.server_sum, MaskedAggregation.decode_sum

    def server_sum(self, payloads):
        payload_types.update(type(p) for p in payloads.values())
        return real_sum(self, payloads)

    def decode_sum(self, total, survivors):
        flat, count = real_decode(self, total, survivors)
        opened.append(np.round(np.asarray(flat), 4).tolist() + [round(float(count), 4)])
        return flat, count

    with monkeypatch.context() as patch:
        patch.setattr(MaskedAggregation, "server_sum", server_sum)
        patch.setattr(MaskedAggregation, "decode_sum", decode_sum)
        run, task = _run(standin, splits=splits, rounds=1,
                         privacy={"name": "secagg", "min_clients": 2})
        run.run_rounds()
    assert payload_types == {bytes}
    final = run.curves[-1]
    view = {"opened": opened, "released": {k: v for k, v in final.items() if k != "round"},
            "global": [np.round(w, 5).tolist() for w in run.global_weights]}
    lab = task.labs["casme_sq"]
    secret = {"test_videos": [v.video for v in lab.test],
              "counts": task.lab_test_counts(run, lab, run.global_weights,
                                             final["thresholds"]["global"])[0].tolist()}
    return view, secret


def test_the_server_sees_only_protected_or_summed_counts(standin, monkeypatch):
    """Two federations differ only in which lab holds one test video: the labs' own test
    counts differ, every sum is the same. Under secure aggregation the server's view (the
    payloads it adds: bytes; the sums it opens; the figures released; the model) is the same
    in both: it cannot tell which lab scored what, let alone a video, score or interval."""
    splits = _splits(standin)
    moved = {db: (list(tr), list(te)) for db, (tr, te) in splits.items()}
    moved["samm_lv"][1].append(moved["casme_sq"][1].pop())
    views, secrets = zip(*(_server_view(standin, s, monkeypatch) for s in (splits, moved)))
    assert secrets[0] != secrets[1]
    assert views[0]["released"]["per_client"] == {}
    assert views[0] == views[1]
    # in the clear the same evaluation does tell the worlds apart (the test can fail)
    plain = [_run(standin, splits=s, rounds=1)[0] for s in (splits, moved)]
    figures = [r.evaluate()["per_client"] for r in plain]
    assert figures[0] != figures[1]


@pytest.mark.parametrize(("privacy", "fed", "match"), [
    ({"name": "dp"}, {}, "DP-SGD's guarantee is per training example"),
    (None, {"faults": {"byzantine": {"clients": ["casme_sq"], "attack": "label_flip"}}},
     "no class labels to flip"),
    (None, {"baselines": True}, "fed_spot.baselines"),
    ({"name": "secagg", "min_clients": 3}, {}, r"set privacy.min_clients=2"),
    (None, {"num_clients": 3}, "one client per long-video database"),
])
def test_what_spotting_cannot_run_is_refused_by_name(standin, privacy, fed, match):
    with pytest.raises(ConfigError, match=match):
        _run(standin, privacy=privacy, **fed)


def test_an_interrupted_spotting_run_resumes_to_the_same_end_state(standin, tmp_path):
    splits = _splits(standin)
    straight, _ = _run(standin, splits=splits, rounds=2)
    straight.run_rounds()
    first, _ = _run(standin, splits=splits, rounds=1, eval_every=2)  # the same recipe
    first.checkpoint = tmp_path / "federated_state.pt"
    first.run_rounds()
    task = SpotTask(APEX, splits, seed=0)
    resumed = FederatedRun(_cfg(rounds=2), None, task.clients, tmp_path, task=task)
    assert resumed.try_resume() and resumed.round_done == 1
    resumed.run_rounds()
    for a, b in zip(straight.global_weights, resumed.global_weights):
        np.testing.assert_array_equal(a, b)
    assert resumed.curves[-1]["pooled_global"] == straight.curves[-1]["pooled_global"]


def test_a_resume_with_no_rounds_left_rebuilds_each_labs_intervals(standin, tmp_path):
    """A run that stopped after its last round (e.g. in the baselines) and is resumed has no
    round to run; the labs must still hold the final spotter's intervals (intervals.csv),
    the same as the run that went straight through (was: none, only the baselines')."""
    splits = _splits(standin)
    first, task = _run(standin, splits=splits, rounds=1)
    first.checkpoint = tmp_path / "federated_state.pt"
    first.run_rounds()
    before = task.lab_intervals["global"]
    again = SpotTask(APEX, splits, seed=0)
    resumed = FederatedRun(_cfg(rounds=1), None, again.clients, tmp_path, task=again)
    assert resumed.try_resume() and resumed.round_done == 1
    resumed.run_rounds()  # nothing left to run
    assert again.statistics(resumed)["thresholds"] == task.statistics(first)["thresholds"]
    assert sorted(again.lab_intervals["global"]) == sorted(before)
    for lab, frame in before.items():
        pd.testing.assert_frame_equal(again.lab_intervals["global"][lab], frame)


def test_fedprox_and_scaffold_act_on_the_spotter(standin):
    """The rules' hooks reach the spotter's module: FedProx's proximal term keeps a lab's
    update nearer the global model; SCAFFOLD trains with plain SGD and moves its controls."""
    splits = _splits(standin)
    drift = {}
    for rule, mu in (("fedavg", 0.0), ("fedprox", 50.0)):
        run, _ = _run(standin, rule=rule, splits=splits, rounds=1, mu=mu)
        run.round(1)
        last = run.state["casme_sq"].last
        drift[rule] = sum(float(np.sum((a - b) ** 2)) for a, b in
                          zip(last, run.initial_weights))
    assert drift["fedprox"] < 0.5 * drift["fedavg"]
    run, _ = _run(standin, rule="scaffold", splits=splits, rounds=1,
                  client_optimizer={"name": "sgd", "momentum": 0.0})
    run.round(1)
    assert any(np.abs(c).sum() > 0 for c in run.server_control)
    assert all(np.isfinite(w).all() for w in run.global_weights)


def test_a_baseline_spotter_does_not_depend_on_the_global_generator(standin):
    """The pooled / local-only baselines are initialised from the run's seed: the same
    network whatever ran before them (it was the global torch generator's state, left by
    the federated part, so the pooled figure changed when that part did)."""
    train = _splits(standin)["casme_sq"][0]
    nets = []
    for disturb in (1, 2):
        torch.manual_seed(disturb)
        torch.rand(disturb * 10)
        nets.append(baseline({**APEX, "epochs": 1}, train, 1, seed=0).module.net.state_dict())
    for k in nets[0]:
        torch.testing.assert_close(nets[0][k], nets[1][k], rtol=0, atol=0)


def test_me_tst_trains_in_the_loop_with_each_labs_own_class_weights(standin):
    """ME-TST's recognition loss weighs classes by a lab's own training frequencies: a
    module buffer outside the network, so it stays at the lab while the network is averaged."""
    me_tst = {"name": "me_tst", "window": 32, "batch_size": 4,
              "net": {"d_model": 8, "n_layers": 1, "d_state": 4, "dropout": 0.0}}
    run, task = _run(standin, spotter=me_tst, rounds=1)
    run.run_rounds()
    trained = [n in run.param_names for n in run.entry_names]
    assert any(not np.allclose(g, i) for g, i, t in zip(run.global_weights,
                                                       run.initial_weights, trained) if t)
    assert all(np.isfinite(w).all() for w in run.global_weights)
    own = {db: run._kept[db].module.class_weights for db in task.labs}
    for db, lab in task.labs.items():
        lab.spotter.setup(lab.fit)  # what the lab alone computes from its fit videos
        torch.testing.assert_close(own[db], lab.spotter.module.class_weights)
    assert set(run.curves[-1]["pooled_global"]) == {"micro", "macro", "all"}
