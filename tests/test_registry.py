"""One way from a config name to a thing (mer.registry.Registry) and the registries that use it:
each answers with the registered thing, refuses an unknown name listing the choices, and
mirrors its conf/ group."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from mer.paths import CONF_DIR
from mer.registry import Registry, UnknownNameError


def _stems(group: str) -> set[str]:
    return {p.stem for p in (CONF_DIR / group).glob("*.yaml")}


# -- the Registry itself -----------------------------------------------------------------------


def test_register_get_names():
    reg = Registry("widget", hint="conf/widget/")

    @reg.register("b")
    def b():
        return "B"

    reg.register("a", len)
    assert reg.get("b") is b and reg["a"] is len
    assert reg.names() == ["a", "b"] and list(reg) == ["a", "b"] and len(reg) == 2
    assert "a" in reg and "c" not in reg and ["unhashable"] not in reg
    assert reg.items() == [("a", len), ("b", b)]


def test_unknown_name_lists_the_choices_and_the_hint():
    reg = Registry("widget", hint="widget=<name>")
    reg.register("gear", object)
    with pytest.raises(UnknownNameError) as e:
        reg.get("gaer")
    assert str(e.value) == "unknown widget 'gaer': use one of ['gear'] (widget=<name>)"
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    with pytest.raises(UnknownNameError, match=r"unknown widget '\['x'\]'"):
        reg.get(["x"])  # an unhashable config value: the same clear error, no TypeError


def test_a_package_error_class_is_raised():
    class WidgetError(ValueError):
        pass

    reg = Registry("widget", error=WidgetError)
    with pytest.raises(WidgetError, match="unknown widget 'x': use one of \\[\\]"):
        reg.get("x")


def test_one_name_for_two_things_is_refused():
    reg = Registry("widget")
    reg.register("x", int)
    reg.register("x", int)  # the same thing again: fine (a module imported twice)
    with pytest.raises(ValueError, match="widget name 'x' is already registered"):
        reg.register("x", float)
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("", float)


# -- the registries mirror conf/ ---------------------------------------------------------------


def test_models_register_themselves_and_mirror_conf_model():
    from mer.models import MODELS, create_model, list_models

    named = {OmegaConf.load(p).get("name") for p in (CONF_DIR / "model").glob("*.yaml")}
    assert set(list_models()) == named - {None} == set(MODELS.names())  # variants: no name
    assert set(MODELS.names()) <= _stems("model")  # each its own conf/model/<name>.yaml
    with pytest.raises(KeyError, match=r"unknown model 'nope': use one of \['dense_attention'"):
        create_model("nope")


def test_databases_register_themselves_and_mirror_conf_data():
    from mer.data.databases import DATABASES, LONG_VIDEO, DatabaseError
    from mer.data.databases.casme2 import EMOTIONS, read_casme2_release

    assert set(DATABASES.names()) <= _stems("data")
    assert set(DATABASES.names()) == {"casme2", "casme3", "casme_sq", "dfme", "fourdme",
                                      "mmew", "samm", "samm_lv", "smic"}
    assert LONG_VIDEO.names() == ["casme_sq", "samm_lv"]
    assert DATABASES.get("casme2") is read_casme2_release and EMOTIONS
    with pytest.raises(DatabaseError, match="unknown database 'casme'"):
        DATABASES.get("casme")


def test_spotters_mirror_conf_spotting():
    from mer.spotting.registry import SPOTTERS, list_spotters

    assert set(list_spotters()) == _stems("spotting") == set(SPOTTERS.names())
    assert all(SPOTTERS.get(n).name == n for n in list_spotters())


def test_privacy_modes_mirror_conf_privacy():
    from mer.privacy import PRIVACY_MODES, from_config

    assert set(PRIVACY_MODES.names()) == _stems("privacy")
    assert from_config(None) is None and from_config({"name": "none"}) is None
    with pytest.raises(ValueError, match=r"unknown privacy 'ckk': use one of \['central_dp'"):
        from_config({"name": "ckk"})


def test_every_federated_rule_has_a_conf_file_and_every_file_a_rule():
    from mer.federated.rules import RULES, rule_names

    used = {OmegaConf.load(p).get("rule", {}).get("name") for p in
            (CONF_DIR / "federated").glob("*.yaml")} - {None}
    assert used == set(RULES.names())
    assert rule_names(private=True) == ("fedavg", "fedbn", "fedprox")
    assert rule_names(robust=True) == ("krum", "median", "trimmed_mean")


def test_rules_aggregate_to_hand_computed_values():
    from mer.federated.rules import RULES

    results = [([np.array([0.0, 4.0])], 1), ([np.array([3.0, 1.0])], 2),
               ([np.array([9.0, 7.0])], 1)]
    expect = {
        "fedavg": [(0 + 6 + 9) / 4, (4 + 2 + 7) / 4],  # example-weighted
        "scaffold": [4.0, 4.0],  # unweighted
        "median": [3.0, 4.0],
        "trimmed_mean": [3.0, 4.0],  # beta 1/3 of 3: one dropped at each end
    }
    cfg = {"beta": 1 / 3, "num_malicious": 0, "num_to_keep": 1}
    for name, want in expect.items():
        got = RULES.get(name).aggregate(cfg, results)
        np.testing.assert_allclose(got[0], want, err_msg=name)
    for alias in ("fedprox", "fedbn"):  # one mean; they differ at the clients
        np.testing.assert_allclose(RULES.get(alias).aggregate(cfg, results)[0],
                                   expect["fedavg"])
    with pytest.raises(ValueError, match="unknown federated rule 'fedavgg'"):
        RULES.get("fedavgg")


def test_config_check_reads_its_choices_from_the_registries():
    from mer import config_check
    from mer.data.labels import LABEL_SCHEMES
    from mer.federated.rules import RULES
    from mer.models import MODELS

    assert config_check._models() == MODELS.names()
    assert config_check._rules() == RULES.names()
    assert config_check._label_schemes() == LABEL_SCHEMES.names()
    problems = config_check.table_problems({"model": {"name": "nope"},
                                            "data": {"label_scheme": "sevenish"}})
    assert any("model.name=nope" in p and "ststnet" in p for p in problems)
    assert any("data.label_scheme=sevenish" in p and "objective5" in p for p in problems)


# -- label schemes -----------------------------------------------------------------------------


def _table(n: int = 5) -> pd.DataFrame:
    rows = [("happiness", (12,), "I"), ("disgust", (9,), ""), ("Surprise", (1, 2), ""),
            ("others", (20,), ""), ("", (4,), "")][:n]
    return pd.DataFrame({"database": "db", "subject": [f"s{i}" for i in range(n)],
                         "clip": [f"c{i}" for i in range(n)],
                         "emotion": [r[0] for r in rows], "aus": [r[1] for r in rows],
                         "objective": [r[2] for r in rows], "row": range(2, 2 + n)})


@pytest.mark.parametrize("scheme, classes, labels", [
    ("composite", ["negative", "positive", "surprise"], [1, 0, 2]),
    ("casme2_5class", ["disgust", "happiness", "others", "repression", "surprise"],
     [1, 0, 4, 2]),
    ("emotion", ["disgust", "happiness", "others", "surprise"], [1, 0, 3, 2]),
    ("objective", ["I", "II", "III", "IV", "V", "VI", "VII"], [0, 3, 1, 5, 2]),
    ("objective5", ["I", "II", "III", "IV", "V"], [0, 3, 1, 2]),
])
def test_each_registered_label_scheme_gives_its_known_labels(scheme, classes, labels):
    from mer.data.labels import LABEL_SCHEMES, apply_label_scheme

    assert scheme in LABEL_SCHEMES
    n = 4 if scheme == "composite" else 5  # a blank emotion is an error there (next test)
    kept, names, excluded = apply_label_scheme(_table(n), scheme, "samm")
    assert names == classes and kept["label"].tolist() == labels
    assert len(kept) + len(excluded) == n


def test_a_mapping_scheme_and_an_unknown_name():
    from mer.data.labels import LabelError, apply_label_scheme

    kept, names, excluded = apply_label_scheme(_table(), {"Happiness": "pos", "disgust": None},
                                               "samm")
    assert names == ["pos"] and kept["clip"].tolist() == ["c0"]
    assert "mapped to null" in excluded[0]["reason"]
    with pytest.raises(LabelError, match=r"unknown label scheme 'seven'.*'objective5'"):
        apply_label_scheme(_table(), "seven", "samm")
    with pytest.raises(LabelError, match=r"sheet row 6 .*composite scheme: unknown emotion ''"):
        apply_label_scheme(_table(), "composite", "samm")
