"""``+experiment=privacy_audit``: accuracy, privacy budget and measured leakage, side by side.

For every setting in ``audit.settings`` (a privacy config plus overrides) the audit trains the
federation of the experiment (same clients, seeds and rounds) and reports:

- utility: pooled UF1 / UAR of the final global model on the clients' test splits;
- budget: epsilon at delta (the largest over clients for DP-SGD; client-level for central
  DP; none for secure aggregation, which hides updates but gives no DP guarantee);
- membership inference: AUC and advantage of the loss-threshold attack on the final global
  model, members = the clients' training clips, non-members = their test clips;
- gradient inversion by the server (:mod:`mer.privacy.attacks.inversion`) on one-clip
  updates of real flow images of the data, starting from the mean of 40 other clips (public
  data the attacker holds): PSNR / SSIM of the reconstruction and label recovery, against
  what that prior alone scores. The server sees one client's update with ``none`` and
  ``central_dp`` (the server adds the noise itself, after seeing the update), a DP-SGD step
  with ``dp``, and only the sum of 3 clients' updates with ``secagg`` / ``ckks``.

It also adds, under threshold secure aggregation (:mod:`mer.privacy.secagg`) with the labs'
real vectors ``[n w, n]`` of the secagg setting's last round:

- **late lab**: one lab's masked input arrives after the collection closed (it is kept by the
  server, outside the sum); the other labs' sum is opened;
- **single survivor**: every lab but one drops after the key exchange; the round is refused
  (fewer than ``privacy.min_clients``), nothing is opened;

and in each the server's reconstruction of that lab's vector from everything it holds
(:func:`mer.privacy.secagg.curious_estimate`) is compared with the same attack given only
what is released (the sum, or nothing): its relative error must be no lower, i.e. the server
learned nothing beyond the sum. Then the DP curve's figures (``audit.dp_curve``: the run
directory of a ``+experiment=dp_curve`` run; its table and plot are copied in) and the table
of what the server sees of each Flower message field (:mod:`mer.privacy.exposure`).

Outputs in the run directory: ``audit.json``, ``audit.md`` (the trade-off table, the
scenarios, the DP curve and the server's view) and ``audit.png`` (UF1 and attack success
against epsilon); ``dp_curve.png`` when a DP curve run was given.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from mer.data.samples import FlowSamples

log = logging.getLogger(__name__)
CONF = Path(__file__).resolve().parents[3] / "conf"
SCENARIO_MIN_CLIENTS = 2  # the late lab and single survivor leave one lab fewer
SERVER_VIEW = {"none": "none", "central_dp": "none", "dp": "dp", "secagg": "secagg",
               "ckks": "secagg"}


def setting_config(cfg: DictConfig, setting: DictConfig, n_clients: int | None = None
                   ) -> tuple[DictConfig, str | None]:
    """The experiment config with ``privacy`` = conf/privacy/<setting.privacy>.yaml plus the
    setting's overrides, and the audit's rounds; and a note when ``privacy.min_clients`` had
    to be lowered to the federation's ``n_clients`` labs (else every protected round would
    be skipped, e.g. on ``data.preset=tiny``'s two labs)."""
    privacy = OmegaConf.load(CONF / "privacy" / f"{setting.privacy}.yaml")
    overrides = {k: v for k, v in OmegaConf.to_container(setting).items()
                 if k not in ("name", "privacy")}
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    note = None
    with open_dict(out):
        out.privacy = OmegaConf.merge(privacy, overrides)
        out.federated.rounds = int(cfg.audit.rounds)
        out.federated.baselines = False
        floor = out.privacy.get("min_clients")
        if n_clients is not None and floor is not None and int(floor) > n_clients >= 2:
            out.privacy.min_clients = n_clients
            note = f"privacy.min_clients lowered from {floor} to {n_clients} ({n_clients} labs)"
            log.warning("audit %s: %s", setting.name, note)
    return out, note


def membership(run, samples: FlowSamples) -> dict:
    """Loss-threshold membership inference against the run's global model."""
    from mer.privacy.attacks.membership import loss_threshold_attack, per_sample_losses

    net = run._module(run.global_weights).net
    x = torch.from_numpy(samples.x)
    y = torch.as_tensor(samples.labels.copy())
    train = np.concatenate([c.train_idx for c in run.clients])
    test = np.concatenate([c.test_idx for c in run.clients])
    attack = loss_threshold_attack(per_sample_losses(net, x[train], y[train]),
                                   per_sample_losses(net, x[test], y[test]))
    return {"auc": attack["auc"], "advantage": attack["advantage"]}


def inversion(samples: FlowSamples, view: str, dp_cfg: dict | None, n: int, steps: int,
              seed: int) -> dict:
    """Mean inversion scores over ``n`` one-clip updates of the data's flow images."""
    from mer.engine.module import MERModule
    from mer.models.registry import create_model
    from mer.privacy.attacks.inversion import InversionConfig, run_inversion
    from mer.privacy.dp import fix_module

    torch.manual_seed(seed)  # the attacked model: STSTNet as the server holds it in round 1
    net = fix_module(MERModule(create_model("ststnet", num_classes=samples.num_classes,
                                            in_channels=samples.x.shape[1], dropout=0.0),
                               samples.num_classes)).net
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(samples.x))
    picks, public = order[:3 * n], order[3 * n:3 * n + 40]  # public: the attacker's prior
    x = torch.from_numpy(samples.x[picks])
    y = torch.as_tensor(samples.labels[picks].copy())
    kwargs = {}
    if view == "dp":
        kwargs = {"noise_multiplier": float(dp_cfg["noise_multiplier"]),
                  "max_grad_norm": float(dp_cfg["max_grad_norm"])}
    runs = [run_inversion(net, x[i:i + 1], y[i:i + 1], view, InversionConfig(steps=steps),
                          others=(x[n + 2 * i:n + 2 * i + 2], y[n + 2 * i:n + 2 * i + 2]),
                          seed=seed + i, public=torch.from_numpy(samples.x[public]),
                          **kwargs) for i in range(n)]
    return {key: float(np.mean([r[key] for r in runs]))
            for key in ("psnr", "ssim", "label_ok", "random_psnr", "prior_psnr", "prior_ssim")}


def _relative_error(estimate: np.ndarray | None, truth: np.ndarray) -> float:
    """``||estimate - truth|| / ||truth||`` (1.0 for no estimate: guessing zeros)."""
    if estimate is None:
        return 1.0
    return float(np.linalg.norm(estimate - truth) / max(np.linalg.norm(truth), 1e-12))


def secagg_scenarios(vectors: dict[str, np.ndarray], target: str | None = None,
                     frac_bits: int = 16) -> dict:
    """The late-lab and single-survivor scenarios of threshold secure aggregation on the labs'
    ``vectors`` (lab -> ``[n w, n]``, (D + 1,)); ``target``: the attacked lab (the first).

    For each: ``held_error``, the relative error of the server's reconstruction of the target
    from everything it holds (:func:`~mer.privacy.secagg.curious_estimate`); ``sum_error``,
    the same attack given only what was released (the sum of the others divided by their
    count as a guess of the target, or zeros, whichever is closer; nothing when the round was
    refused); ``learned_nothing``: ``held_error >= sum_error``. ``opened``: whether a sum was
    released, and its error against the true sum of its contributors.
    """
    from mer.privacy.base import TooFewContributors
    from mer.privacy.secagg import (
        MaskParams,
        SecAggParty,
        SecAggServer,
        curious_estimate,
        encode_fixed,
    )

    names = list(vectors)
    target = target or names[0]
    params = MaskParams(frac_bits=frac_bits, min_clients=SCENARIO_MIN_CLIENTS)
    out = {}
    for scenario in ("late_lab", "single_survivor"):
        parties = {c: SecAggParty(c, 1, params) for c in names}
        server = SecAggServer(1, names, params)
        roster = server.receive_keys({c: p.advertise() for c, p in parties.items()})
        relayed = server.receive_shares({c: p.share_keys(roster) for c, p in parties.items()})
        for c, p in parties.items():
            p.receive_shares(relayed[c], server.u2)
        masked = {c: p.mask(encode_fixed(vectors[c], frac_bits, params.mask_bits))
                  for c, p in parties.items()}
        others = [c for c in names if c != target]
        if scenario == "late_lab":
            arrived = {c: masked[c] for c in others}
        else:  # every lab but the target dropped after the key exchange
            arrived = {target: masked[target]}
        total = server.receive_masked(arrived)
        if scenario == "late_lab":
            server.receive_late(target, masked[target])
        opened, sum_estimate, sum_error = False, None, None
        try:
            survivors, dropped = server.unmask_request()
            answers = {u: parties[u].unmask(survivors, dropped) for u in survivors}
            flat, count = server.unmask(answers, total)
            released = np.append(flat, count)
            truth = sum(vectors[c] for c in survivors)
            opened, sum_error = True, _relative_error(released, truth)
            sum_estimate = released / len(survivors)  # the others' mean as a guess
        except TooFewContributors as e:
            log.info("scenario %s: %s", scenario, e)
        truth = vectors[target]
        guess = min(_relative_error(sum_estimate, truth) if sum_estimate is not None else 1.0,
                    1.0)
        held = _relative_error(curious_estimate(server, target), truth)
        out[scenario] = {"target": target, "opened": opened, "released_sum_error": sum_error,
                         "held_error": held, "sum_error": guess,
                         "learned_nothing": bool(held >= guess)}
    return out


def lab_vectors(run) -> dict[str, np.ndarray]:
    """Each lab's ``[n w, n]`` of its last local model (``run.state``; the initial model
    for a lab that never trained)."""
    from mer.privacy.base import weighted_vector

    return {c.name: weighted_vector(run.state[c.name].last or run.initial_weights,
                                    len(c.train_idx)) for c in run.clients}


def dp_curve_figures(path: str | None, run_dir: Path) -> dict | None:
    """The DP curve's summary from a ``+experiment=dp_curve`` run directory (its
    ``dp_curve.json``; the plot copied beside the audit), or None when not given."""
    if not path:
        return None
    import shutil

    from mer.experiments.dp_curve import curve_markdown, summarise

    folder = Path(str(path)).expanduser()
    source = folder / "dp_curve.json"
    if not source.is_file():
        raise FileNotFoundError(f"audit.dp_curve={path}: no dp_curve.json there; run python -m "
                                "mer.run +experiment=dp_curve first and give its run directory "
                                "(or audit.dp_curve=null to leave the curve out)")
    report = json.loads(source.read_text())
    if (folder / "dp_curve.png").is_file():
        shutil.copyfile(folder / "dp_curve.png", run_dir / "dp_curve.png")
    return {"source": str(source), "summary": summarise(report),
            "markdown": curve_markdown(report)}


def run_audit(cfg: DictConfig, run_dir: Path) -> dict:
    """Every setting of ``cfg.audit``: train, attack, tabulate."""
    from mer.data.sources import load_samples
    from mer.federated.loop import FederatedRun, make_clients

    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    samples = load_samples(cfg.data, cfg.paths.cache_dir)
    clients = make_clients(cfg, samples)
    rows, vectors = [], None
    for setting in cfg.audit.settings:
        t0 = time.perf_counter()
        scfg, note = setting_config(cfg, setting, len(clients))
        run = FederatedRun(scfg, samples, clients)
        run.run_rounds()
        final = run.evaluate()["pooled_global"]
        budget = run.epsilons()
        eps = max(budget["clients"].values()) if "clients" in budget else budget.get("central")
        view = SERVER_VIEW[setting.privacy]
        inv = inversion(samples, view, OmegaConf.to_container(scfg.privacy), int(
            cfg.audit.inversion.samples), int(cfg.audit.inversion.steps), int(cfg.seed))
        rows.append({"setting": setting.name, "privacy": setting.privacy,
                     "uf1": final["uf1"], "uar": final["uar"], "epsilon": eps,
                     "delta": budget.get("delta"), "mia": membership(run, samples),
                     "server_sees": view, "inversion": inv, "note": note,
                     "seconds": time.perf_counter() - t0})
        log.info("audit %s done in %.0f s", setting.name, rows[-1]["seconds"])
        if vectors is None or setting.privacy == "secagg":
            vectors = lab_vectors(run)
    from mer.privacy import exposure

    run_dir.mkdir(parents=True, exist_ok=True)
    report = {"name": cfg.name, "synthetic": samples.synthetic, "model": cfg.model.name,
              "rule": cfg.federated.name, "rounds": int(cfg.audit.rounds),
              "clients": [c.name for c in clients], "settings": rows,
              "scenarios": secagg_scenarios(vectors) if len(vectors) >= 2 else None,
              "dp_curve": dp_curve_figures(cfg.audit.get("dp_curve"), run_dir),
              "server_view": exposure.as_records()}
    (run_dir / "audit.json").write_text(json.dumps(report, indent=2))
    (run_dir / "audit.md").write_text(audit_markdown(report))
    plot_audit(report, run_dir / "audit.png")
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(audit_markdown(report)))
    return report


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def audit_markdown(report: dict) -> str:
    tag = " (SYNTHETIC data)" if report["synthetic"] else ""
    lines = [
        f"# Privacy audit: {report['model']}, {report['rule']}, {len(report['clients'])} "
        f"clients, {report['rounds']} rounds{tag}", "",
        "| setting | UF1 | UAR | epsilon (delta) | MIA AUC | MIA advantage | server sees | "
        "inversion PSNR dB | SSIM | label recovered |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["settings"]:
        eps = "∞ (no DP)" if r["epsilon"] is None else \
            f"{_fmt(r['epsilon'], 2)} ({r['delta']:.0e})"
        inv = r["inversion"]
        lines.append(
            f"| {r['setting']} | {_fmt(r['uf1'])} | {_fmt(r['uar'])} | {eps} | "
            f"{_fmt(r['mia']['auc'])} | {_fmt(r['mia']['advantage'])} | {r['server_sees']} | "
            f"{_fmt(inv['psnr'], 1)} | {_fmt(inv['ssim'])} | {_fmt(inv['label_ok'], 2)} |")
    notes = [f"- {r['setting']}: {r['note']}" for r in report["settings"] if r.get("note")]
    lines += [""] + notes if notes else []
    first = report["settings"][0]["inversion"]
    lines += ["", f"Inversion baselines: a random image scores {_fmt(first['random_psnr'], 1)} "
              f"dB; the attacker's prior alone (the mean of 40 public clips it starts from) "
              f"{_fmt(first['prior_psnr'], 1)} dB, SSIM {_fmt(first['prior_ssim'])}: an "
              "attack that does not beat it learned nothing from the update. MIA AUC 0.5 = "
              "chance. Inversion attacks a one-clip update of the round-1 model (STSTNet); "
              "under secure aggregation the server sees the sum of 3 clients' updates."]
    lines += scenario_markdown(report.get("scenarios"))
    curve = report.get("dp_curve")
    lines += ["", "## DP curve", ""]
    lines += [curve["markdown"].strip(), "", f"(from {curve['source']}; plot: dp_curve.png)"] \
        if curve else ["Not included: give audit.dp_curve=RUN_DIR of a python -m mer.run "
                       "+experiment=dp_curve run."]
    from mer.privacy.exposure import markdown_table

    lines += ["", "## What the server sees of each Flower message field", "",
              markdown_table().strip()]
    return "\n".join(lines) + "\n"


def scenario_markdown(scenarios: dict | None) -> list[str]:
    """The late-lab and single-survivor table (relative reconstruction errors)."""
    lines = ["", "## Secure aggregation: late lab and single survivor", ""]
    if not scenarios:
        return lines + ["Not run: the scenarios need at least 2 labs."]
    lines += ["| scenario | target | sum opened | error from all the server holds | "
              "error from the sum alone | learned nothing beyond the sum |",
              "|---|---|---|---|---|---|"]
    for name, r in scenarios.items():
        lines.append(f"| {name.replace('_', ' ')} | {r['target']} | "
                     f"{'yes' if r['opened'] else 'no (refused)'} | {r['held_error']:.3g} | "
                     f"{r['sum_error']:.3g} | {'yes' if r['learned_nothing'] else 'NO'} |")
    return lines + ["", "Relative L2 error of the server's reconstruction of the target lab's "
                    "[n w, n] (1 = no better than guessing zeros; a masked input alone "
                    "decodes to uniform noise, errors far above 1)."]


def plot_audit(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["settings"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))

    def finite(eps: float | None) -> bool:
        return eps is not None and math.isfinite(eps)

    bounded = [r["epsilon"] for r in rows if finite(r["epsilon"])]
    inf_x = 2 * max(bounded) if bounded else 1.0  # settings without a DP bound at the right
    for r in rows:
        x = r["epsilon"] if finite(r["epsilon"]) else inf_x
        axes[0].scatter(x, r["uf1"], label=r["setting"])
        axes[1].scatter(x, r["mia"]["auc"], label=r["setting"])
    axes[0].set(xlabel="epsilon (no DP at the right)", ylabel="pooled UF1", xscale="log")
    axes[1].set(xlabel="epsilon (no DP at the right)", ylabel="membership-inference AUC",
                xscale="log")
    axes[1].axhline(0.5, color="grey", ls="--", lw=1)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"privacy audit: {report['model']}"
                 f"{' (synthetic data)' if report['synthetic'] else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
