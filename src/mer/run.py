"""``python -m mer.run``: the thin Hydra entry point over ``conf/``.

Examples::

    python -m mer.run +experiment=synme_ststnet
    python -m mer.run +experiment=megc2019_ststnet data.root=/path/to/flowcache
    python -m mer.run -m model=ststnet,offapexnet
    python -m mer.run +experiment=fed_psyau privacy=ckks
    python -m mer.run +experiment=privacy_audit
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """Run the experiment a config describes; returns the overall UF1 (for sweepers)."""
    from mer.engine.runner import run_federated_experiment, run_recognition

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.get("audit"):
        from mer.privacy.audit import run_audit

        report = run_audit(cfg, run_dir)
        return report["settings"][0]["uf1"]
    if cfg.get("federated"):
        results = run_federated_experiment(cfg, run_dir)
        return results["federated"]["final"]["pooled_personalised"]["uf1"]
    results = run_recognition(cfg, run_dir)
    return results["metrics"]["overall"]["uf1"]


if __name__ == "__main__":
    main()
