"""A federated experiment end to end: data -> the federated protocol (``federated.protocol``:
hold-out or federated LOSO, :mod:`mer.federated.protocols`) -> results.json, predictions.csv,
curves.csv, rounds.csv, the summary table and the W&B run.

The federated half of what was ``mer.engine.runner``: the engine runs centralised protocols and
knows no federation; ``mer.run`` calls :func:`run_federated_experiment` for a config with
``federated``, and the Flower server app calls :func:`write_federated_results`.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from mer.data.io import atomic_write_text
from mer.data.samples import FlowSamples
from mer.data.sources import load_samples
from mer.engine.report import write_csv
from mer.federated.protocols import run_federated_protocol


def run_federated_experiment(cfg: DictConfig, run_dir: Path) -> dict:
    """A federated run: results.json with per-round curves, per-client and pooled figures,
    predictions.csv, curves.csv and rounds.csv (CSV logs), W&B with ``logger=wandb``."""
    t0 = time.perf_counter()
    samples = load_samples(cfg.data, cfg.paths.cache_dir)
    t_data = time.perf_counter() - t0
    fed = run_federated_protocol(cfg, samples, run_dir, show_progress=bool(cfg.progress))
    timings = {"data_s": t_data, "federated_s": time.perf_counter() - t0 - t_data}
    results = write_federated_results(cfg, samples, fed, timings, run_dir)
    _print_federated(results, run_dir)
    return results


def write_federated_results(cfg: DictConfig, samples: FlowSamples, fed: dict, timings: dict,
                            run_dir: Path, transport: str | None = None) -> dict:
    """results.json, the CSV tables and the W&B run of a finished federated run (in-process
    or over ``transport``); ``fed`` still holds its ``predictions``. Returns the results."""
    predictions = fed.pop("predictions")
    generated = fed.pop("generated", None)  # data.augment.generate: made inside each lab
    results = {
        "name": cfg.name, "synthetic": samples.synthetic, "federated": fed,
        "data": {**samples.provenance, "synthetic": samples.synthetic,
                 "n_samples": len(samples.meta), "class_names": samples.class_names,
                 "excluded": samples.excluded},
        "timings": timings,
        "environment": {"python": platform.python_version(), "machine": platform.machine()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if generated is not None:  # generated.csv: each one, its source, drivers, labs
        results["generated"] = generated
    text = json.dumps(results, indent=2, default=str)  # fails before anything is written
    federated_tables(samples, fed, predictions, run_dir)
    atomic_write_text(run_dir / "results.json", text)
    log_wandb_federated(cfg, run_dir, results, transport=transport)
    return results


def federated_tables(samples: FlowSamples, fed: dict, predictions: dict, run_dir: Path) -> None:
    """predictions.csv (one row per test clip, one column per model kind; ``generated``: never
    true, a generated clip is never tested), curves.csv and rounds.csv."""
    idx = predictions["index"]
    meta = samples.meta.iloc[idx]
    df = pd.DataFrame({"database": meta["database"].to_numpy(),
                       "subject": meta["subject"].to_numpy(), "clip": meta["clip"].to_numpy(),
                       "label": meta["label"].to_numpy(),
                       "generated": meta["generated"].to_numpy(bool) if "generated" in meta
                       else False})
    for kind, pred in predictions["pred"].items():
        df[f"pred_{kind}"] = pred
    write_csv(df, run_dir / "predictions.csv")
    rows = [{"round": c["round"], "client": client, "model": kind, **m}
            for c in fed.get("curves", []) for client, r in
            list(c["per_client"].items()) + [("pooled", {k[len("pooled_"):]: v for k, v in c.items()
                                                       if k.startswith("pooled_")})]
            for kind, m in r.items()]
    if rows:
        write_csv(pd.DataFrame(rows), run_dir / "curves.csv")
    if fed.get("rounds"):
        write_csv(pd.DataFrame([{k: (",".join(v) if isinstance(v, list) else v)
                                 for k, v in r.items()} for r in fed["rounds"]]),
                  run_dir / "rounds.csv")


def _print_federated(results: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    fed = results["federated"]
    final = fed["final"]
    tag = " [bold yellow](SYNTHETIC data)[/]" if results["synthetic"] else ""
    console = Console()
    if fed["protocol"]["kind"] == "loso":
        t = Table(title=f"{results['name']}: federated LOSO, {fed['protocol']['folds']} folds, "
                        f"pooled predictions{tag}")
        for col in ("model", "n", "UF1", "UAR"):
            t.add_column(col)
        for key, m in final.items():
            t.add_row(key[len("pooled_"):], str(m["n"]), f"{m['uf1']:.4f}", f"{m['uar']:.4f}")
        console.print(t)
        console.print(f"outputs: {run_dir}")
        return
    table = Table(title=f"{results['name']}: federated, round {final['round']}{tag}")
    for col in ("client", "n test", "global UF1", "global UAR", "personal UF1", "personal UAR"):
        table.add_column(col)
    rows = list(final["per_client"].items()) + [
        ("pooled", {"global": final["pooled_global"], "personalised":
                    final["pooled_personalised"]})]
    for name, r in rows:
        g, p = r["global"], r["personalised"]
        table.add_row(name, str(g["n"]), f"{g['uf1']:.4f}", f"{g['uar']:.4f}",
                      f"{p['uf1']:.4f}", f"{p['uar']:.4f}")
    console.print(table)
    base = fed.get("baselines")
    if base:
        t = Table(title="federated vs pooled vs local (same test splits; UF1 / UAR)")
        for col in ("client", "federated global", "federated personalised", "pooled", "local"):
            t.add_column(col)
        scopes = list(final["per_client"]) + ["pooled"]
        for scope in scopes:
            def cell(src: dict, kind: str, scope: str = scope) -> str:
                m = src[f"pooled_{kind}"] if scope == "pooled" else src["per_client"][scope][kind]
                return f"{m['uf1']:.3f} / {m['uar']:.3f}"

            t.add_row(scope, cell(final, "global"), cell(final, "personalised"),
                      cell(base, "pooled"), cell(base, "local"))
        console.print(t)
    if "repeats" in fed:
        t = Table(title=f"over {len(fed['repeats']['seeds'])} seeds: mean ± std")
        for col in ("model", "UF1", "UAR"):
            t.add_column(col)
        for kind, m in fed["repeats"]["summary"].items():
            t.add_row(kind, f"{m['uf1']['mean']:.3f} ± {m['uf1']['std']:.3f}",
                      f"{m['uar']['mean']:.3f} ± {m['uar']['std']:.3f}")
        console.print(t)
    counts = fed.get("counts", {})
    if any(counts.values()):
        console.print("faults: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    console.print(f"outputs: {run_dir}")


def log_wandb_federated(cfg: DictConfig, run_dir: Path, results: dict,
                        transport: str | None = None) -> None:
    """One W&B run per federated job (group ``logger.wandb.group``: the experiment name;
    offline unless set otherwise): pooled curves, each client's figures keyed
    ``client/<name>/...``, per-round failures, final figures. ``transport``: e.g. ``flower``
    (its per-client training metrics are logged too)."""
    wb = cfg.logger.get("wandb")
    if not wb:
        return
    import wandb

    fed = results["federated"]
    suffix = f"-{transport}" if transport else ""
    run = wandb.init(project=wb.project, group=wb.group, name=f"{cfg.name}{suffix}-{run_dir.name}",
                     mode=wb.mode, dir=str(run_dir), job_type=f"federated{suffix}",
                     config=results["config"], tags=list(wb.get("tags", [])) +
                     ([transport] if transport else []) +
                     (["synthetic"] if results["synthetic"] else []))
    steps: dict[int, dict] = {}
    for m in (fed.get("transport") or {}).get("client_metrics", []):
        steps.setdefault(m["round"], {}).update(
            {f"client/{m['client']}/{k}": v for k, v in m.items() if k not in ("round", "client")})
    for curve in fed.get("curves", []):
        row = steps.setdefault(curve["round"], {})
        row.update({f"{k}/{s}": v[s] for k, v in curve.items() if k.startswith("pooled_")
                    for s in ("uf1", "uar")})
        row.update({f"client/{c}/{kind}_{s}": m[s] for c, r in curve["per_client"].items()
                    for kind, m in r.items() for s in ("uf1", "uar")})
    for r in fed.get("rounds", []):
        steps.setdefault(r["round"], {})["failed"] = len(r["failed"])
    for rnd in sorted(steps):
        run.log(steps[rnd], step=rnd)
    run.summary.update({f"{k}/{s}": v[s] for k, v in fed["final"].items()
                        if k.startswith("pooled_") for s in ("uf1", "uar")})
    for k, v in (fed.get("baselines") or {}).items():
        if k.startswith("pooled_"):
            run.summary.update({f"baseline_{k}/uf1": v["uf1"], f"baseline_{k}/uar": v["uar"]})
    run.summary.update({"synthetic": results["synthetic"],
                        **({"failed": fed["counts"]["failed"]} if "counts" in fed else {})})
    run.finish()
