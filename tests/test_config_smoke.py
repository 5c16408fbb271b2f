"""Every file under conf/ composes, passes validation (mer.config_check) and runs one tiny step.

The files are found by globbing conf/, so a config added later is picked up with no edit here;
a new config *group* fails until it has a step in ``STEPS``. A step is the smallest real use
of the option: a data option loads (SynME tiny, a flow-cache export) or, for a real database
that cannot be here, fails naming ``data.root``; a model trains one optimiser step; a
protocol/trainer/logger option runs one LOSO fold of one epoch; a federated rule, server
optimiser or privacy option runs one round over three tiny in-process clients; an experiment
runs in-process (``mer.run.run``) with every count shrunk to 1 (:func:`shrunk`); a Hydra
option has every ``_target_`` importable.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf, open_dict

from mer.config_check import check_config
from mer.run import CONFIG_DIR

sys.path.insert(0, str(Path(__file__).parent / "federated"))
from fedtoys import toy_samples  # noqa: E402

CONF = Path(CONFIG_DIR)
FILES = sorted(p.relative_to(CONF) for p in CONF.rglob("*.yaml") if p.name != "config.yaml")
OPTIONS = [(str(p.parent), p.stem) for p in FILES]  # (group, option)
# counts that make a run long; an experiment's own keys of these names are shrunk to these
SHRINK = {"max_epochs": 1, "epochs": 1, "local_epochs": 1, "baseline_epochs": 1, "rounds": 1,
          "repeats": 1, "full_repeats": 1, "local_steps": 1, "steps": 2, "samples": 1,
          "num_sites": 2, "eval_every": 1}
SHRINK_LISTS = {"epsilons"}  # a curve's points: one is enough to run the code


def _compose(overrides: list[str], hydra_node: bool = False):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_node)


def _selecting(group: str, option: str) -> list[str]:
    """Overrides that select ``option`` of ``group`` (with what it needs to make sense)."""
    if group == "experiment":
        return [f"+experiment={option}"]
    if group == "privacy":
        return ["federated=fedavg", f"privacy={option}"]  # privacy applies to federations
    if group == "federated/server_opt":
        return ["federated=fedavg", f"federated/server_opt={option}"]
    if group == "hydra":
        return []  # hydra: default is the root's own choice
    if (group, option) == ("protocol", "cross_db"):  # needs the databases named
        return ["protocol=cross_db", "data.preset=tiny", "protocol.train=[tinyA]"]
    return [f"{group}={option}"]


@pytest.fixture(scope="session")
def tiny_cfg():
    return _compose(["data.preset=tiny"])


@pytest.fixture(scope="session")
def tiny(tiny_cfg):
    """SynME tiny (2 databases x 4 subjects x 3 clips), from the default cache."""
    from mer.data.sources import load_samples

    return load_samples(tiny_cfg.data, tiny_cfg.paths.cache_dir)


@pytest.fixture(scope="session")
def flowcache_root(tiny, tmp_path_factory):
    from mer.data.databases.flowcache import write_flowcache

    root = tmp_path_factory.mktemp("flowcache")
    write_flowcache(tiny, root)
    return root


@pytest.fixture(scope="session")
def toy():
    """Three tiny databases (3 subjects x 2 clips each) of learnable 3x28x28 'flow'."""
    return toy_samples(n_db=3, n_subjects=3, per_subject=2, learnable=True)


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_every_config_file_composes_and_passes_validation(group, option):
    cfg = _compose(_selecting(group, option), hydra_node=group.startswith("hydra"))
    check_config(cfg)
    if group == "experiment":
        assert cfg.name == option
    elif group.startswith("hydra/"):
        sub = group.split("/", 1)[1]
        assert OmegaConf.select(cfg, f"hydra.{sub}") is not None
    elif group == "federated/server_opt":
        assert cfg.federated.server_opt.name == OmegaConf.load(
            CONF / group / f"{option}.yaml").name
    elif group != "hydra":
        assert cfg[group] is not None


@pytest.mark.parametrize("launcher", ["submitit_local", "submitit_slurm"])
def test_the_plugins_own_launcher_configs_pass_validation(launcher):
    """README says ``hydra/launcher=submitit_local`` (the plugin's own defaults, with
    ``cpus_per_task: null``) works as well as mer's: the check must not refuse it."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = _compose([f"hydra/launcher={launcher}"], hydra_node=True)
    assert cfg.hydra.launcher.cpus_per_task is None  # the plugin's default, left to submitit
    check_config(cfg)


# -- one tiny step per group ------------------------------------------------------------------


def _tiny_preset(data) -> str:
    """SynME's small size of the same draw (a stand-in's own ``dfme_tiny``), else ``tiny``."""
    from mer.data.synthetic import PRESETS

    preset = str(data.get("preset", "default"))
    if data.get("kind") == "synme" and (preset.endswith("tiny") or f"{preset}_tiny" in PRESETS):
        return preset if preset.endswith("tiny") else f"{preset}_tiny"
    return "tiny"


def shrunk(cfg, extra: list[str] | None = None, tiny_data: bool = True):
    """``cfg`` with every count in :data:`SHRINK` set to its small value (where larger), lists
    in :data:`SHRINK_LISTS` cut to their first item, one LOSO fold, one worker, SynME tiny
    (``tiny_data``); then checked again."""
    cfg = cfg.copy()

    def walk(node):
        for key in list(node.keys()) if OmegaConf.is_dict(node) else range(len(node)):
            value = node[key]
            if OmegaConf.is_config(value):
                walk(value)
            elif key in SHRINK and isinstance(value, int) and not isinstance(value, bool) \
                    and value > SHRINK[key]:
                node[key] = SHRINK[key]
            elif key in SHRINK_LISTS and OmegaConf.is_list(value) and len(value) > 1:
                node[key] = value[:1]

    with open_dict(cfg):
        walk(cfg)
        for data in (cfg.data if tiny_data else None,
                     OmegaConf.select(cfg, "model.pretrain.data")):  # a pretraining set too
            if data is not None and data.get("kind") in ("synme", "synme_lv"):
                data.preset = _tiny_preset(data)
        if cfg.get("spot") is not None:  # spotting: one LOSO fold, no pictures
            cfg.spot.fold_index, cfg.spot.timelines = [0], False
        if not cfg.get("federated"):
            cfg.protocol.fold_index, cfg.protocol.workers = 0, 1
        else:
            cfg.federated.workers = 1
        cfg.progress = False
    for item in extra or []:
        key, value = item.split("=", 1)
        OmegaConf.update(cfg, key, yaml.safe_load(value), force_add=True)
    check_config(cfg)
    return cfg


def _recognition_step(cfg, tmp_path, flowcache_root):
    """One LOSO fold of one epoch through the runner: results.json with finite scores."""
    import json

    from mer.run import run

    extra = [f"data.root={flowcache_root}"] if cfg.data.kind == "flowcache" else []
    uf1 = run(shrunk(cfg, extra), tmp_path)
    results = tmp_path / "results.json"
    if results.exists():
        saved = json.loads(results.read_text())
        assert saved["synthetic"] is True
    assert np.isfinite(uf1) and 0.0 <= uf1 <= 1.0
    return results


def step_data(group, option, cfg, ctx):
    from mer.data.databases.registry import DATABASES
    from mer.data.sources import DataConfigError, load_samples

    kind = cfg.data.kind
    if kind == "synme" and cfg.data.get("preset", "default") == "default" and \
            not cfg.data.get("macro"):
        samples = load_samples(shrunk(cfg).data, cfg.paths.cache_dir)
        assert samples.synthetic and samples.x.shape[1:] == (3, 28, 28)
        assert set(samples.meta["database"]) == {"tinyA", "tinyB"}
    elif kind == "synme":  # another SynME draw (a stand-in preset, the macro-expressions)
        from mer.data.sources import synme_config

        assert synme_config(shrunk(cfg).data).databases  # resolves; its experiment loads it
    elif kind == "flowcache":
        with open_dict(cfg):
            cfg.data.root = str(ctx["flowcache_root"])
        samples = load_samples(cfg.data, cfg.paths.cache_dir)
        assert len(samples.meta) == len(ctx["tiny"].meta) and samples.synthetic
    elif kind == "synme_lv":  # long videos: its config resolves, each set has its reader
        from mer.data.databases.registry import LONG_VIDEO
        from mer.data.sources import synme_lv_config

        syn = synme_lv_config(shrunk(cfg).data)
        assert syn.databases and all(d.name in LONG_VIDEO for d in syn.databases)
    elif kind in DATABASES or kind == "composite":  # real data cannot be here: a clear error
        assert kind == "composite" or kind in DATABASES  # the reader resolves
        with pytest.raises(DataConfigError, match=r"data\.roots?\b"):
            load_samples(cfg.data, cfg.paths.cache_dir)
        with open_dict(cfg):
            if kind == "composite":
                cfg.data.roots = {name: str(ctx["tmp_path"] / "absent") for name in cfg.data.roots}
            else:
                cfg.data.root = str(ctx["tmp_path"] / "absent")
        with pytest.raises(DataConfigError, match=r"data\.roots?\b.*absent|absent"):
            load_samples(cfg.data, cfg.paths.cache_dir)
    else:
        pytest.fail(f"data.kind={kind}: no smoke step; add one to step_data")


def step_model(group, option, cfg, ctx):
    """Build the module on SynME tiny and take one optimiser step (HTNet at a CPU size)."""
    import lightning as L

    from mer.data.datamodule import SplitDataModule
    from mer.engine.build import build_module, uses_aus

    samples = ctx["tiny"]
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    kwargs = model_cfg.get("kwargs") or {}
    if "block_repeats" in kwargs:  # the published HTNet is ~140M parameters
        kwargs.update(dim=48, block_repeats=[1] * len(kwargs["block_repeats"]))
    train = np.arange(8)
    torch.manual_seed(0)
    module = build_module(model_cfg, samples, train)
    dm = SplitDataModule(samples, train, train, batch_size=4, shuffle=False, seed=0,
                         with_aus=uses_aus(module))
    before = [p.detach().clone() for p in module.parameters() if p.requires_grad]
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, accelerator="cpu", devices=1)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1
    after = [p.detach() for p in module.parameters() if p.requires_grad]
    assert before and any(not torch.equal(a, b) for a, b in zip(before, after))


def step_recognition(group, option, cfg, ctx):
    _recognition_step(cfg, ctx["tmp_path"], ctx["flowcache_root"])
    assert (ctx["tmp_path"] / "results.json").exists()


def _one_round(cfg, samples, rounds: int = 1):
    from mer.federated.loop import FederatedRun, make_clients

    cfg = shrunk(cfg, ["federated.baselines=false", "data.batch_size=4"], tiny_data=False)
    with open_dict(cfg):
        cfg.model = OmegaConf.create({"name": "ststnet", "lr": 1e-2, "weight_decay": 0.0,
                                      "optimizer": "adam", "kwargs": {}})
    clients = make_clients(cfg, samples)
    run = FederatedRun(cfg, samples, clients)
    start = [w.copy() for w in run.global_weights]
    record = run.round(1)
    run.close()
    return run, record, start


def step_federated(group, option, cfg, ctx):
    """One round over three tiny clients with the rule (and its server optimiser)."""
    from mer.federated.server_opt import OPTIMIZERS

    run, record, start = _one_round(cfg, ctx["toy"])
    assert record["clients"] == ["db0", "db1", "db2"] and not record["failed"]
    assert not record.get("skipped")
    assert type(run.server_opt) is OPTIMIZERS[cfg.federated.server_opt.name]
    assert any(not np.array_equal(a, b) for a, b in zip(start, run.global_weights))
    scores = run.evaluate()
    assert 0.0 <= scores["pooled_global"]["uf1"] <= 1.0


def step_privacy(group, option, cfg, ctx):
    """One FedAvg round over three tiny clients under the privacy option."""
    run, record, start = _one_round(cfg, ctx["toy"])
    assert run.privacy_name == cfg.privacy.name
    assert not record["failed"] and not record.get("skipped"), record
    assert any(not np.array_equal(a, b) for a, b in zip(start, run.global_weights))
    if cfg.privacy.name in ("dp", "central_dp"):
        budget = run.epsilons()
        eps = max(budget["clients"].values()) if "clients" in budget else budget["central"]
        assert 0 < eps < float("inf")


def step_paths(group, option, cfg, ctx):
    """The cache folder resolves to an absolute path (the one every run uses)."""
    import os

    cache = Path(cfg.paths.cache_dir)
    assert cache.is_absolute()
    if os.environ.get("MER_CACHE_DIR"):
        assert cache == Path(os.environ["MER_CACHE_DIR"])


def step_hydra(group, option, cfg, ctx):
    """Every ``_target_`` of the Hydra option imports (a launcher: its plugin is installed)."""
    node = OmegaConf.to_container(cfg.hydra, resolve=False)
    targets = []

    def walk(n):
        if isinstance(n, dict):
            targets.extend(v for k, v in n.items() if k == "_target_")
            for v in n.values():
                walk(v)
        elif isinstance(n, list):
            for v in n:
                walk(v)

    walk(node["launcher"] if group == "hydra/launcher" else node)
    assert targets or group == "hydra"
    for target in targets:
        assert get_class(target) is not None


def step_experiment(group, option, cfg, ctx):
    """The experiment in-process (``mer.run.run``), every count shrunk to 1, on SynME tiny;
    a sweep's options exist."""
    sweep = OmegaConf.select(_compose([f"+experiment={option}"], hydra_node=True),
                             "hydra.sweeper.params") or {}
    for key, values in sweep.items():
        if (CONF / key).is_dir():
            for value in str(values).split(","):
                assert (CONF / key / f"{value.strip()}.yaml").exists(), (key, value)
    if cfg.data.kind not in ("synme", "synme_lv", "flowcache"):  # real data, not here
        from mer.data.sources import DataConfigError
        from mer.run import run

        with pytest.raises(DataConfigError, match=r"data\.roots?\b"):
            run(shrunk(cfg), ctx["tmp_path"])
        return
    _recognition_step(cfg, ctx["tmp_path"], ctx["flowcache_root"])
    assert any(ctx["tmp_path"].iterdir())


def step_spotting(group, option, cfg, ctx):
    """The spotter builds from its config (training one needs long videos: the spotting
    experiments' steps)."""
    from mer.spotting.registry import create_spotter

    spotter = create_spotter(OmegaConf.to_container(cfg.spotting, resolve=True), seed=0)
    assert spotter.name == cfg.spotting.name


STEPS = {"spotting": step_spotting, "data": step_data, "model": step_model,
         "protocol": step_recognition, "trainer": step_recognition, "logger": step_recognition,
         "federated": step_federated, "federated/server_opt": step_federated,
         "privacy": step_privacy, "paths": step_paths, "hydra": step_hydra,
         "hydra/launcher": step_hydra, "experiment": step_experiment}


# An experiment on SynME tiny with every count shrunk is still up to minutes of CPU on 2
# cores: beyond the two the README starts with, experiments' steps are `slow` (their fast
# siblings: the compose-and-validate test above, and every option's own step).
FAST_EXPERIMENTS = {"synme_ststnet", "fed_psyau"}


def _step_params():
    for group, option in OPTIONS:
        slow = group == "experiment" and option not in FAST_EXPERIMENTS
        yield pytest.param(group, option, id=f"{group}/{option}",
                           marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("group, option", list(_step_params()))
def test_every_config_file_runs_one_tiny_step(group, option, request, tmp_path):
    if group not in STEPS:
        pytest.fail(f"conf/{group}: a config group with no smoke step; add one to STEPS in "
                    f"{Path(__file__).name}")
    ctx = {"tmp_path": tmp_path}
    if group in ("data", "model", "protocol", "trainer", "logger", "experiment"):
        ctx["tiny"] = request.getfixturevalue("tiny")
        ctx["flowcache_root"] = request.getfixturevalue("flowcache_root")
    if group in ("federated", "federated/server_opt", "privacy"):
        ctx["toy"] = request.getfixturevalue("toy")
    cfg = _compose(_selecting(group, option), hydra_node=group.startswith("hydra"))
    STEPS[group](group, option, cfg, ctx)
