"""``python -m mer.run``: the thin Hydra entry point over ``conf/``.

Examples::

    python -m mer.run +experiment=synme_ststnet
    python -m mer.run +experiment=megc2019_ststnet data.root=/path/to/flowcache
    python -m mer.run -m model=ststnet,offapexnet
    python -m mer.run +experiment=fed_psyau privacy=ckks
    python -m mer.run +experiment=privacy_audit
    python -m mer.run +experiment=dp_curve
    python -m mer.run +experiment=sticker_audit
    python -m mer.run +experiment=generate_augment
    python -m mer.run +experiment=deidentify
    python -m mer.run +experiment=spot_synme
    python -m mer.run +experiment=fed_spot
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mer.cli import user_errors_exit
from mer.config_check import check_or_exit
from mer.engine.runlock import one_run_per_folder
from mer.paths import CONF_DIR

CONFIG_DIR = str(CONF_DIR)  # kept: tests and scripts import it from here


def run(cfg: DictConfig, run_dir: Path) -> float:
    """Run the experiment ``cfg`` describes, writing into ``run_dir``; its headline UF1.

    What :func:`main` does once Hydra has composed and checked the config (tests call it with
    a composed config)."""
    if cfg.get("dp_curve"):
        from mer.experiments.dp_curve import run_dp_curve

        return run_dp_curve(cfg, run_dir)["summary"]["best_dp_uf1"]
    if cfg.get("fed_spot"):
        from mer.experiments.fed_spot import run_fed_spot

        return run_fed_spot(cfg, run_dir)["headline"]
    if cfg.get("spotters") or cfg.get("spotting"):
        from mer.spotting.runner import headline, run_spotting

        return headline(run_spotting(cfg, run_dir))
    if cfg.get("sticker_audit"):
        from mer.experiments.sticker_audit import run_sticker_audit

        return run_sticker_audit(cfg, run_dir)["success_by"]["placement"].get("causal", 0.0)
    if cfg.get("generate_augment"):
        from mer.experiments.generate_augment import run_generate_augment

        return run_generate_augment(cfg, run_dir)["arms"]["with"]["overall"]["uf1"]
    if cfg.get("deidentify"):
        from mer.experiments.deidentify import run_deidentify

        return run_deidentify(cfg, run_dir)["recognition"]["deidentified"]["uf1"]
    if cfg.get("audit"):
        from mer.experiments.privacy_audit import run_audit

        report = run_audit(cfg, run_dir)
        return report["settings"][0]["uf1"]
    if cfg.get("federated"):
        from mer.federated.runner import run_federated_experiment

        results = run_federated_experiment(cfg, run_dir)
        return results["federated"]["final"]["pooled_personalised"]["uf1"]
    from mer.engine.runner import run_recognition

    results = run_recognition(cfg, run_dir)
    return results["metrics"]["overall"]["uf1"]


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
@user_errors_exit  # mer's own errors: "mer: <message>", exit 2, no stack trace
@one_run_per_folder  # one run per hydra.run.dir (.mer.lock); SIGTERM unwinds (resume=true)
def main(cfg: DictConfig) -> float:
    """Run the experiment a config describes; returns the overall UF1 (for sweepers). A bad
    config is reported (every problem, on stderr) and exits with status 2 before any work."""
    check_or_exit(cfg)
    return run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
