"""Every config composes: each experiment, and each option of each group."""

import functools
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


# -- validation in one place (mer.config_check) ---------------------------------------------


def _problems(overrides):
    from mer.config_check import ConfigError, check_config

    with pytest.raises(ConfigError) as err:
        check_config(_compose(overrides))
    return err.value.problems, str(err.value)


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@functools.cache
def _composed(overrides: tuple[str, ...]):
    return _compose(list(overrides))


def _every_config():
    """Overrides for every experiment, every option of every group, and every rule and every
    privacy option under the main job (what a user can select and sweep)."""
    sets = [[]] + [[f"+experiment={e}"] for e in EXPERIMENTS]
    for group in sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"
                        and p.name != "experiment"):
        sets += [[f"{group}={o}"] + (["federated=fedavg"] if group == "privacy" else [])
                 for o in _options(group)]
    sets += [["+experiment=fed_psyau", f"federated={o}"] for o in _options("federated")]
    sets += [["+experiment=fed_psyau", f"privacy={o}"] for o in _options("privacy")]
    return sets


@pytest.mark.parametrize("overrides", [s for s in _every_config() if "+experiment=fed_psyau" in s
                                       and len(s) == 2], ids=" ".join)
def test_every_rule_and_privacy_passes_validation_under_the_main_job(overrides):
    """(Each file on its own: tests/test_config_smoke.py.) SynME's 3 databases are 3 clients:
    enough for Multi-Krum's 3 and the protected sums' privacy.min_clients=3."""
    from mer.config_check import check_config

    check_config(_composed(tuple(overrides)))


def test_the_bad_values_found_by_the_independent_test_are_all_reported_at_once():
    problems, msg = _problems([
        "federated=fedavg", "federated.rounds=0", "trainer.max_epochs=-1", "data.batch_size=0",
        "federated.local_epochs=0", "federated.faults.dropout=1.5", "federated.min_clients=5"])
    assert len(problems) == 6, msg
    for key, value, allowed in [
            ("federated.rounds", "0", ">= 1"), ("trainer.max_epochs", "-1", ">= 1"),
            ("data.batch_size", "0", ">= 1"), ("federated.local_epochs", "0", ">= 1"),
            ("federated.faults.dropout", "1.5", "[0, 1)"),
            ("federated.min_clients", "5", "3 clients")]:
        line = next(p for p in problems if p.startswith(f"{key}={value}"))
        assert allowed in line and ("e.g." in line or "set " in line), line


def test_trainer_max_epochs_zero_is_refused():
    problems, _ = _problems(["trainer.max_epochs=0"])
    assert problems == ["trainer.max_epochs=0: must be an integer >= 1 (-1 would train for "
                        "ever, 0 not at all); e.g. trainer.max_epochs=1"]


@pytest.mark.parametrize("override", [
    "model.lr=0", "model.lr=-0.001", "model.optimizer=rmsprop", "model.kwargs.dropout=1.0",
    "data.flow.method=lk", "data.on_error=ignore", "data.label_scheme=seven", "data.workers=-1",
    "data.preset=huge", "data.face.min_confidence=2", "protocol.select=best", "protocol.workers=0",
    "protocol.val_subjects=-0.2", "seed=-1", "trainer.log_every_n_steps=0", "federated.fraction=0",
    "federated.eval_every=0", "federated.workers=0", "federated.mu=-1",
    "federated.partition.kind=random", "federated.partition.test_fraction=1",
    "federated.partition.alpha=0", "federated.faults.stragglers.probability=-0.1",
    "federated.faults.stragglers.work=0", "federated.faults.byzantine.attack=flood",
    "federated.faults.deadline_s=0", "federated.rule.name=mean", "federated.server_opt.lr=0",
    "federated.protocol.kind=kfold", "federated.protocol.repeats=0",
    "federated.personalise.own=1.5",
])
def test_a_bad_value_is_named_with_its_key_and_range(override):
    problems, msg = _problems(["federated=pfedprox", override])
    assert len(problems) == 1 and problems[0].startswith(override + ": must be"), msg
    assert "must be" in problems[0] and "e.g." in problems[0]


@pytest.mark.parametrize("privacy, override, key", [
    ("dp", "privacy.delta=1", "privacy.delta=1"),
    ("dp", "privacy.max_grad_norm=0", "privacy.max_grad_norm=0"),
    ("dp", "privacy.noise_multiplier=-1", "privacy.noise_multiplier=-1"),
    ("dp", "privacy.accountant=moments", "privacy.accountant=moments"),
    ("central_dp", "privacy.clip_norm=0", "privacy.clip_norm=0"),
    ("ckks", "privacy.poly_modulus_degree=5000", "privacy.poly_modulus_degree=5000"),
    ("secagg", "privacy.mask_bits=72", "privacy.mask_bits=72"),
    ("secagg", "privacy.frac_bits=63", "privacy.frac_bits=63 leaves no integer bits"),
    ("ckks", "privacy.chunk_size=8192", "privacy.chunk_size=8192 > 4096"),
    ("ckks", "privacy.scale_bits=59", "privacy.scale_bits=59 leaves no room"),
])
def test_a_bad_privacy_value_is_named(privacy, override, key):
    problems, msg = _problems(["federated=fedavg", f"privacy={privacy}", override])
    assert [p for p in problems if p.startswith(key)], msg


def test_select_on_validation_needs_validation_subjects():
    problems, _ = _problems(["protocol.select=val_uf1"])
    assert problems[0].startswith("protocol.select=val_uf1 needs validation subjects")
    from mer.config_check import check_config

    check_config(_compose(["protocol.select=val_uf1", "protocol.val_subjects=0.2"]))


def test_rules_that_need_individual_updates_are_refused_under_secure_aggregation():
    problems, _ = _problems(["federated=median", "privacy=secagg"])
    assert problems[0].startswith("federated.rule.name=median cannot run under privacy=secagg")
    problems, _ = _problems(["federated=scaffold", "privacy=dp"])
    assert problems[0].startswith("federated.rule.name=scaffold cannot run under privacy=dp")


def test_privacy_without_a_federation_is_refused():
    problems, _ = _problems(["privacy=dp"])
    assert problems[0].startswith("privacy=dp needs a federated run")


def test_client_counts_known_from_the_config_are_checked():
    # SynME tiny: 2 databases, so 2 clients in the natural partition
    problems, _ = _problems(["federated=fedavg", "data.preset=tiny", "federated.min_clients=3"])
    assert problems == [
        "federated.min_clients=3 but the federation has 2 clients (the natural partition: one "
        "client per database ['tinyA', 'tinyB']): set federated.min_clients<=2, or ask for more "
        "clients (e.g. federated.num_clients=3: natural databases are split into "
        "subject-disjoint sites; or federated.partition.kind=iid)"]
    problems, _ = _problems(["federated=multikrum", "data.preset=tiny"])
    assert [p for p in problems
            if p.startswith("federated.rule.num_to_keep=3 but the federation has 2")]
    problems, _ = _problems(["federated=krum", "data.preset=tiny"])  # 1 malicious of 2
    assert problems[0].startswith("federated.rule.num_malicious=1 but the federation has 2")
    problems, _ = _problems(["federated=fedavg", "data.preset=tiny",
                             "federated.partition.kind=iid", "federated.num_clients=50"])
    assert problems == ["federated.num_clients=50 but 50 clients need 2 subjects each and the "
                        "data has 8 ({'tinyA': 4, 'tinyB': 4}): ask for at most 4"]
    problems, _ = _problems(["data.preset=tiny", "protocol.fold_index=[1,8]"])
    assert problems[0].startswith("protocol.fold_index=8: LOSO over 8 subjects")
    problems, _ = _problems(["federated=fedavg", "data.preset=tiny", "privacy=secagg"])
    assert problems[0].startswith("privacy.min_clients=3 but the federation has 2 clients")
    problems, _ = _problems(["federated=fedavg", "federated.faults.byzantine.clients=[synZ]"])
    assert problems[0].startswith("federated.faults.byzantine.clients: synZ is not a client")
    problems, _ = _problems(["federated=fedavg", "federated.rounds=3",
                             "federated.faults.crash=[{client: synA, round: 4}]"])
    assert problems[0].startswith("federated.faults.crash[0].round=4 is after the last round")


def test_server_opt_keys_of_another_optimiser_are_refused():
    problems, _ = _problems(["federated=fedavg", "federated.server_opt.name=fedadam"])
    assert {p.split(":")[0] for p in problems} == {"federated.server_opt.lr",
                                                   "federated.server_opt.momentum"}


def test_audit_settings_are_checked_as_privacy_configs():
    problems, _ = _problems(["+experiment=privacy_audit",
                             "audit.settings=[{name: a, privacy: dp, noise_multiplier: -1},"
                             " {name: b, privacy: secagg, sigma: 2}, {name: c, privacy: dpp}]"])
    assert [p.split(":")[0].split("=")[0] for p in problems] == [
        "audit.settings[2].privacy", "audit.settings[0].noise_multiplier",
        "audit.settings[1].sigma"]


def test_every_numeric_key_under_conf_has_a_rule():
    """A numeric key added to conf/ without a range in mer.config_check.RULES fails here."""
    from omegaconf import OmegaConf

    from mer.config_check import RULES, find

    def leaves(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from leaves(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from leaves(v, f"{prefix}[{i}]")
        elif isinstance(node, int | float) and not isinstance(node, bool):
            yield prefix

    missing = set()
    for overrides in _every_config():
        cfg = _composed(tuple(overrides))
        tree = OmegaConf.to_container(cfg, resolve=True)
        covered = {k for rule in RULES for k, _ in find(tree, rule.key)}
        for key in leaves(tree):
            if key not in covered and not any(key.startswith(c + "[") for c in covered):
                missing.add(key)
    assert not missing, f"numeric keys without a rule in mer.config_check.RULES: {missing}"
    for option in _options("hydra/launcher"):
        launcher = {"hydra": {"launcher": _compose_hydra([f"hydra/launcher={option}"])}}
        covered = {k for rule in RULES for k, _ in find(launcher, rule.key)}
        assert set(leaves(launcher)) <= covered, set(leaves(launcher)) - covered


def _compose_hydra(overrides):
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=False)


def test_a_launcher_value_out_of_range_is_named():
    from mer.config_check import ConfigError, check_config

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm",
                                           "hydra.launcher.timeout_min=0"],
                      return_hydra_config=True)
    with pytest.raises(ConfigError, match=r"hydra\.launcher\.timeout_min=0: must be an integer"):
        check_config(cfg)


# -- what only the data says: a fold without validation subjects, the clients made --------


def _toy(n_db=2, n_subjects=3):
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "federated"))
    from fedtoys import toy_samples

    return toy_samples(n_db=n_db, n_subjects=n_subjects)


def test_select_on_validation_with_a_fold_of_no_validation_subjects_is_an_error():
    """val_subjects=0.01 of 5 training subjects rounds to 0: the fold would silently use its
    last epoch while results.json says val_uf1."""
    from omegaconf import OmegaConf

    from mer.engine.protocols import ProtocolError
    from mer.engine.runner import make_folds

    protocol = OmegaConf.create({"name": "loso", "select": "val_uf1", "val_subjects": 0.01,
                                 "fold_index": None})
    with pytest.raises(ProtocolError, match=r"fold 'db0/s0'.*protocol\.val_subjects=0\.01"):
        make_folds(_toy(), protocol, seed=0)
    protocol.val_subjects = 0.2  # 1 of 5: every fold has one
    assert all(len(f.val_idx) for f in make_folds(_toy(), protocol, seed=0))


def test_make_clients_refuses_more_min_clients_than_clients_but_not_for_one_lab():
    from omegaconf import OmegaConf

    from mer.config_check import ConfigError
    from mer.federated.loop import make_clients

    cfg = OmegaConf.create({"seed": 0, "privacy": {"name": "none"}, "federated": {
        "min_clients": 3, "num_clients": None, "rule": {"name": "fedavg"}, "faults": {},
        "partition": {"kind": "natural", "test_fraction": 0.4}}})
    with pytest.raises(ConfigError, match=r"federated\.min_clients=3 but the federation has 2 "
                                          r"clients \(made by the natural partition"):
        make_clients(cfg, _toy())
    # a Flower lab may hold its own database alone: the federation's count is the server's
    assert [c.name for c in make_clients(cfg, _toy(n_db=1), whole_federation=False)] == ["db0"]
    cfg.federated.min_clients = 2
    assert [c.name for c in make_clients(cfg, _toy())] == ["db0", "db1"]


def test_a_bad_value_on_the_command_line_exits_before_any_work(tmp_path):
    """``python -m mer.run ... federated.faults.dropout=1.5``: status 2, the key on stderr, no
    traceback, no results.json, and no data generated (the cache stays empty)."""
    import os
    import subprocess
    import sys

    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    cmd = [sys.executable, "-m", "mer.run", "federated=fedavg", "federated.faults.dropout=1.5",
           "data.preset=tiny", "federated.rounds=1", "federated.baselines=false",
           "progress=false", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MER_CACHE_DIR": str(cache)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "federated.faults.dropout=1.5: must be a number in [0, 1)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "results.json").exists()
    assert not cache.exists() or not any(cache.iterdir())
