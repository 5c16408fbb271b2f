"""``+experiment=generate_augment``: LOSO UF1 with and without K driven sequences per training
clip (:mod:`mer.data.generate.augment`), same seeds, same folds, same schedule; nothing chosen
on a test fold (the generated sequences come from each fold's training subjects only and are
never tested). On SynME it also measures how well a driven sequence moves as the fused
driving motion says (:func:`mer.data.generate.fidelity.motion_fidelity`, end-point errors).

Outputs in the run directory: ``without/`` and ``with/`` (each a full recognition run:
results.json, predictions.csv with its ``generated`` column, ``generated.csv`` for the
augmented arm), ``generate_augment.json`` and ``generate_augment.md``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from mer.data.io import atomic_write_text


def command_line() -> str:
    """The ``python -m mer.run ...`` command of this run (its overrides), for the report."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except (ValueError, ImportError):
        overrides = sys.argv[1:]
    return "python -m mer.run " + " ".join(overrides)


def _arm(cfg: DictConfig, k: int, name: str) -> DictConfig:
    arm = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(arm):
        arm.data.setdefault("augment", {})
        arm.data.augment.generate = int(k)
        arm.name = f"{cfg.name}-{name}"
        arm.pop("generate_augment", None)
    return arm


def run_generate_augment(cfg: DictConfig, run_dir: Path) -> dict:
    """Both arms, the motion check (SynME), the report; returns it."""
    from mer.data.generate.fidelity import motion_fidelity
    from mer.data.sources import load_samples
    from mer.engine.runner import run_recognition

    ga = cfg.generate_augment
    arms = {}
    for name, k in (("without", 0), ("with", int(ga.generate))):
        res = run_recognition(_arm(cfg, k, name), run_dir / name)
        arms[name] = {"generate": k, "overall": res["metrics"]["overall"],
                      "per_database": res["metrics"]["per_database"],
                      "generated": res.get("generated"),
                      "n_real_samples": res["data"]["n_samples"]}
    synthetic = bool(res["synthetic"])
    report = {"name": cfg.name, "synthetic": synthetic,
              "label": "synthetic (SynME)" if synthetic else "real",
              "command": command_line(), "seed": int(cfg.seed),
              "protocol": {"name": cfg.protocol.name, "selection": cfg.protocol.select,
                           "epochs": int(cfg.trainer.max_epochs)},
              "model": cfg.model.name, "arms": arms,
              "delta_uf1": arms["with"]["overall"]["uf1"] - arms["without"]["overall"]["uf1"],
              "delta_uar": arms["with"]["overall"]["uar"] - arms["without"]["overall"]["uar"]}
    mc = ga.get("motion_check") or {}
    if synthetic and int(mc.get("samples", 0)) > 0:
        samples = load_samples(cfg.data, cfg.paths.cache_dir)
        fid = motion_fidelity(samples, int(mc.samples), int(mc.get("drivers", 3)),
                              OmegaConf.to_container(cfg.data.flow, resolve=True),
                              cfg.paths.cache_dir, seed=int(cfg.seed),
                              motion=str(cfg.data.augment.get("motion", "tps")))
        report["motion_check"] = fid
    atomic_write_text(run_dir / "generate_augment.json", json.dumps(report, indent=2,
                                                                     default=str))
    atomic_write_text(run_dir / "generate_augment.md", markdown(report))
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    """The report as a short markdown page."""
    a = report["arms"]
    lines = [f"# generate_augment: LOSO with and without driven sequences ({report['label']})",
             "", f"Command: `{report['command']}`", "",
             f"Model {report['model']}, protocol {report['protocol']['name']} "
             f"({report['protocol']['selection']} epoch of {report['protocol']['epochs']}), "
             f"seed {report['seed']}; same folds and seeds in both arms; generated sequences "
             "from each fold's training subjects only, never tested.", "",
             "| arm | K per clip | generated (distinct) | UF1 | UAR | accuracy |",
             "|---|---|---|---|---|---|"]
    for name in ("without", "with"):
        m, g = a[name]["overall"], a[name]["generated"] or {}
        lines.append(f"| {name} | {a[name]['generate']} | {g.get('n_generated', 0)} | "
                     f"{m['uf1']:.4f} | {m['uar']:.4f} | {m['accuracy']:.4f} |")
    lines += ["", f"UF1 with - without: {report['delta_uf1']:+.4f}; UAR: "
                  f"{report['delta_uar']:+.4f}."]
    mc = report.get("motion_check")
    if mc:
        m = mc["mean"]
        lines += ["", f"## Motion check ({mc['sequences']} driven sequences, {mc['drivers']} "
                      "drivers each; end-point error in px over the source face, mean)", "",
                  "| flow of the driven clip vs | EPE px |", "|---|---|",
                  f"| the fused driving motion it was asked to render | "
                  f"{m['epe_vs_intended']:.3f} |",
                  f"| (zero flow vs the fused driving motion: no motion at all) | "
                  f"{m['epe_zero_vs_intended']:.3f} |",
                  f"| the true fused motion (SynME truth) | {m['epe_vs_true_fused']:.3f} |",
                  f"| (intended vs true fused motion) | {m['epe_intended_vs_true']:.3f} |",
                  f"| (zero flow vs true fused motion: no motion at all) | "
                  f"{m['epe_zero_vs_true']:.3f} |",
                  f"| (drivers' own flow vs their true motion: the flow method's floor) | "
                  f"{m['epe_drivers_flow_vs_true']:.3f} |"]
    return "\n".join(lines) + "\n"
