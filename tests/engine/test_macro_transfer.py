"""Macro-to-micro transfer: no held-out subject in a fold's pretraining, the head hand-over,
refusing another architecture, and SynME's macro-expressions."""

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from mer.data.samples import FlowSamples
from mer.engine.build import build_module
from mer.engine.protocols import loso_folds
from mer.engine.transfer import (
    TransferError,
    pretraining_index,
    read_checkpoint,
    transfer_state,
)
from mer.models.registry import create_model
from mer.run import CONFIG_DIR


def _samples(subjects: list[str], per_subject: int, classes: list[str],
             seed: int = 0) -> FlowSamples:
    rows = [{"database": "db", "subject": s, "clip": f"{s}_{c}", "label": c % len(classes)}
            for s in subjects for c in range(per_subject)]
    x = np.random.default_rng(seed).random((len(rows), 3, 28, 28), np.float32)
    return FlowSamples(x, pd.DataFrame(rows), classes)


MODEL = {"name": "ststnet", "lr": 1e-2, "weight_decay": 0.0, "optimizer": "adam",
         "kwargs": {"dropout": 0.0}}


def _with_pretraining(epochs: int = 1) -> dict:
    # data: what would be loaded; the test attaches the pretraining samples itself
    return {**MODEL, "pretrain": {"data": {"kind": "synme"}, "epochs": epochs,
                                  "batch_size": 8}}


def test_no_held_out_subject_is_in_its_folds_pretraining():
    micro = _samples(["s1", "s2", "s3", "s4"], 2, ["a", "b", "c"])
    # macro clips of the same subjects, plus a subject only the macro data has
    micro.pretrain = _samples(["s1", "s2", "s3", "s4", "m9"], 3, ["a", "b", "c"], seed=1)
    folds = loso_folds(micro, val_subjects=1, seed=0)
    assert len(folds) == 4
    for fold in folds:
        torch.manual_seed(0)
        module = build_module(_with_pretraining(), micro, fold.train_idx)
        keys = micro.meta["subject_key"].to_numpy()
        held_out = set(keys[fold.test_idx]) | set(keys[fold.val_idx])
        used = set(module.transfer["subjects"])
        assert used.isdisjoint(held_out), (fold.name, used & held_out)
        assert used == {"db/m9"} | set(keys[fold.train_idx])
        assert module.transfer["excluded_subjects"] == sorted(held_out)
        assert module.transfer["n"] == 3 * len(used)


def test_pretraining_index_keeps_subjects_only_the_macro_data_has():
    micro = _samples(["s1", "s2"], 1, ["a", "b"])
    macro = _samples(["s1", "s2", "x"], 2, ["a", "b"])
    idx, excluded = pretraining_index(micro, np.array([0]), macro)  # s2 held out
    assert macro.meta["subject"].to_numpy()[idx].tolist() == ["s1", "s1", "x", "x"]
    assert excluded == ["db/s2"]


def test_pretraining_on_held_out_subjects_only_is_refused():
    micro = _samples(["s1", "s2"], 1, ["a", "b", "c"])
    micro.pretrain = _samples(["s2"], 2, ["a", "b", "c"])
    with pytest.raises(TransferError, match="holds out"):
        build_module(_with_pretraining(), micro, np.array([0]))


def test_a_head_that_does_not_fit_is_reinitialised_and_logged(caplog):
    torch.manual_seed(0)
    pretrained = create_model("ststnet", num_classes=5).state_dict()
    net = create_model("ststnet", num_classes=3)
    fresh_head = net.fc.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="mer.engine.transfer"):
        report = transfer_state(net, pretrained, "the pretrained ststnet")
    assert report["reinitialised"] == ["fc.bias", "fc.weight"]
    assert "head does not fit" in caplog.text and "fc.weight (5, 400) vs (3, 400)" in caplog.text
    assert torch.equal(net.fc.weight, fresh_head)
    body = [k for k in pretrained if not k.startswith("fc.")]
    assert all(torch.equal(net.state_dict()[k], pretrained[k]) for k in body)


def test_same_head_shape_but_other_classes_is_reinitialised_too(caplog):
    micro = _samples(["s1", "s2", "s3"], 2, ["negative", "positive", "surprise"])
    micro.pretrain = _samples(["m1", "m2"], 3, ["anger", "happiness", "other"])
    with caplog.at_level(logging.WARNING, logger="mer.engine.transfer"):
        module = build_module(_with_pretraining(), micro, np.arange(4))
    assert module.transfer["transfer"]["reinitialised"] == ["fc.bias", "fc.weight"]
    assert "classes differ" in caplog.text
    # the same classes: the head is handed over as well
    micro.pretrain = _samples(["m1", "m2"], 3, ["negative", "positive", "surprise"])
    module = build_module(_with_pretraining(), micro, np.arange(4))
    assert module.transfer["transfer"]["reinitialised"] == []


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_layers(tmp_path):
    other = create_model("offapexnet", num_classes=3).state_dict()
    with pytest.raises(TransferError, match=r"different architecture.*missing: branches\.0\.0"
                                            r"\.weight.*unexpected: u_stream\.0\.weight"):
        transfer_state(create_model("ststnet", num_classes=3), other, "ckpt.pt")
    small = create_model("mfdan", num_classes=3).state_dict()
    with pytest.raises(TransferError, match=r"shaped differently: pos_embed \(1, 49, 32\) vs "
                                            r"\(1, 196, 256\)"):
        transfer_state(create_model("mfdan", num_classes=3, size="published"), small, "ckpt")
    # the same refusal through model.pretrain.checkpoint (a Lightning-style file)
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in other.items()}}, path)
    assert set(read_checkpoint(path)) == set(other)
    micro = _samples(["s1", "s2"], 2, ["a", "b", "c"])
    with pytest.raises(TransferError, match="mismatched layers"):
        build_module({**MODEL, "pretrain": {"checkpoint": str(path)}}, micro, np.array([0, 1]))


def test_the_experiment_config_pretrains_on_synme_macro():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=dense_macro_micro"])
    assert cfg.model.name == "dense_attention"
    pre = cfg.model.pretrain
    assert pre.data.kind == "synme" and pre.data.macro is True and pre.epochs >= 1
    assert "macro" not in cfg.data  # the micro data stays SynME itself
    assert pre.data.preset == cfg.data.preset and pre.data.seed == cfg.data.seed


# -- SynME macro-expressions -------------------------------------------------------------------


def test_synme_fingerprints_are_unchanged_by_the_macro_option():
    from mer.data import synthetic as syn

    # the fingerprints before the option existed: every cached SynME keeps its root
    assert syn.default_synme_config(0).fingerprint().startswith("9096e5d1dbdaf153")
    assert syn.tiny_synme_config(0).fingerprint().startswith("97605b7cbb6b1a04")
    macro = syn.tiny_synme_config(0)
    macro.macro = True
    assert macro.fingerprint() != syn.tiny_synme_config(0).fingerprint()
    assert syn.SynMEConfig.from_dict(macro.to_dict()).macro is True


def test_synme_macro_has_the_same_subjects_with_larger_longer_motion(tmp_path):
    from mer.data import synthetic as syn

    spec = syn.SynDatabaseSpec(name="m", fps=60, height=64, width=64, color=False,
                               n_subjects=2, clips_per_subject=(2, 4),
                               emotion_weights={"happiness": 1.0, "surprise": 1.0})
    micro = syn.load_meta(syn.generate_synme(syn.SynMEConfig(1, [spec]), tmp_path / "a") / "m")
    macro = syn.load_meta(syn.generate_synme(syn.SynMEConfig(1, [spec], macro=True),
                                             tmp_path / "b") / "m")
    assert micro["subjects"].keys() == macro["subjects"].keys()
    for sub in micro["subjects"]:
        a, b = micro["subjects"][sub], macro["subjects"][sub]
        assert a["landmarks"] == b["landmarks"] and a["identity"] == b["identity"]
        assert all(name.startswith("MA") for name in b["clips"])
        assert 1 <= len(b["clips"]) <= 2
        micro_clips, macro_clips = a["clips"].values(), b["clips"].values()
        assert min(c["peak_px"] for c in macro_clips) > max(c["peak_px"] for c in micro_clips)
        assert min(c["offset"] - c["onset"] for c in macro_clips) > \
            max(c["offset"] - c["onset"] for c in micro_clips)
        clip = next(iter(b["clips"]))
        disp = syn.apex_displacement(tmp_path / "b" / "m", sub, clip, macro)
        assert np.sqrt((disp ** 2).sum(-1)).max() > syn.MAX_DISPLACEMENT_PX  # macro cap
