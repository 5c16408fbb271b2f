"""Benchmark: mer's STSTNet LOSO (Lightning, fold worker processes) against a plain loop.

Both sides train the same STSTNet on the same SynME flow images with the same hyper-parameters
and seeds, one LOSO fold per subject, and are scored on the pooled predictions. The plain side
is what a researcher writes by hand: one process, folds one after another, a torch DataLoader
over a TensorDataset. Target: mer at least 1.8x faster on 2 cores, UF1/UAR within 0.03.

    python scripts/bench_loso.py --epochs 60
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from torch.nn import functional as F
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from mer.data.sources import load_samples
from mer.engine.metrics import recognition_metrics
from mer.engine.protocols import loso_folds, run_folds
from mer.engine.runner import training_spec
from mer.models.registry import create_model
from mer.run import CONFIG_DIR


def plain_loso(samples, folds, spec: dict) -> np.ndarray:
    """The hand-written reference: sequential folds, plain PyTorch. Returns pooled predictions."""
    m = spec["model"]
    x_all = torch.from_numpy(samples.x)
    y_all = torch.from_numpy(samples.labels.copy())
    preds = np.empty(len(y_all), dtype=np.int64)
    for fold in folds:
        seed = spec["seed"] + fold.index
        torch.manual_seed(seed)
        net = create_model(m["name"], num_classes=samples.num_classes, **m.get("kwargs", {}))
        opt = torch.optim.Adam(net.parameters(), lr=m["lr"], weight_decay=m["weight_decay"])
        train = TensorDataset(x_all[fold.train_idx], y_all[fold.train_idx])
        # the same shuffling stream as mer's (a seeded sampler), so that with the same thread
        # count both sides compute the same thing
        sampler = RandomSampler(train, generator=torch.Generator().manual_seed(seed)) \
            if spec["shuffle"] else None
        loader = DataLoader(train, batch_size=spec["batch_size"], sampler=sampler)
        net.train()
        for _ in range(spec["trainer"]["max_epochs"]):
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            preds[fold.test_idx] = net(x_all[fold.test_idx]).argmax(1).numpy()
    return preds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--preset", default="default", help="SynME preset: default or tiny")
    parser.add_argument("--workers", default="auto", help="mer fold workers")
    parser.add_argument("--plain-threads", type=int, default=0,
                        help="torch threads of the plain loop (0: torch's default, all cores)")
    parser.add_argument("--folds", type=int, default=0, help="only the first N folds (0: all)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    overrides = ["+experiment=synme_ststnet", f"trainer.max_epochs={args.epochs}",
                 f"data.preset={args.preset}", "progress=false"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    samples = load_samples(cfg.data, cfg.paths.cache_dir)
    folds = loso_folds(samples)[:args.folds or None]
    spec = training_spec(cfg, None)
    if args.plain_threads:
        torch.set_num_threads(args.plain_threads)
    truth = np.concatenate([samples.labels[f.test_idx] for f in folds])
    print(f"SynME ({args.preset}): {len(samples.meta)} samples, {len(folds)} LOSO folds, "
          f"{args.epochs} epochs, batch {spec['batch_size']}, torch threads "
          f"{torch.get_num_threads()}")

    t0 = time.perf_counter()
    results = run_folds(samples, folds, spec, workers=args.workers, show_progress=False)
    t_mer = time.perf_counter() - t0
    pred_mer = np.concatenate([r["probs"].argmax(1) for r in results])

    t0 = time.perf_counter()
    pred_plain_all = plain_loso(samples, folds, spec)
    t_plain = time.perf_counter() - t0
    pred_plain = np.concatenate([pred_plain_all[f.test_idx] for f in folds])

    m_mer = recognition_metrics(truth, pred_mer, samples.class_names)
    m_plain = recognition_metrics(truth, pred_plain, samples.class_names)
    agree = float((pred_mer == pred_plain).mean())
    figures = {
        "samples": len(samples.meta), "folds": len(folds), "epochs": args.epochs,
        "plain_threads": torch.get_num_threads(), "prediction_agreement": round(agree, 4),
        "mer_s": round(t_mer, 2), "plain_s": round(t_plain, 2),
        "speedup": round(t_plain / t_mer, 2),
        "mer_uf1": round(m_mer["uf1"], 4), "mer_uar": round(m_mer["uar"], 4),
        "plain_uf1": round(m_plain["uf1"], 4), "plain_uar": round(m_plain["uar"], 4),
    }
    print(f"{'':8}{'seconds':>10}{'UF1':>8}{'UAR':>8}")
    print(f"{'mer':8}{t_mer:10.1f}{m_mer['uf1']:8.4f}{m_mer['uar']:8.4f}")
    print(f"{'plain':8}{t_plain:10.1f}{m_plain['uf1']:8.4f}{m_plain['uar']:8.4f}")
    print(f"plain loop threads {torch.get_num_threads()}; predictions agree on {agree:.1%}")
    print(f"speed-up {figures['speedup']:.2f}x (target >= 1.8x); |dUF1| "
          f"{abs(m_mer['uf1'] - m_plain['uf1']):.4f}, |dUAR| "
          f"{abs(m_mer['uar'] - m_plain['uar']):.4f} (target <= 0.03); SYNTHETIC data")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
