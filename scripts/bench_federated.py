"""Benchmark: the federated loop against centralised training of the same model for the same
total sample-steps, side by side in one run.

Federated: R rounds, every client trains E local epochs on its own split (a Lightning
Trainer per client per round, its module kept across rounds unless
``--set federated.reuse_clients=false``), the server aggregates. Centralised: one Trainer trains the
same initial model for R * E epochs on the union of the clients' training splits, so both
sides pass over the same number of (sample, epoch) pairs. Reported: wall time of each side and
the federated overhead (target at most 10%), server time per round (checks, aggregation,
server optimiser, personalisation), bytes each client sends per round (= bytes it receives),
and both sides' test figures on the clients' test splits (SYNTHETIC data).

    python scripts/bench_federated.py                      # FED-PsyAU: DPK-GAT, P-FedProx
    python scripts/bench_federated.py --model ststnet --rounds 20 --json out.json
    python scripts/bench_federated.py --workers 2          # two clients trained at once
    python scripts/bench_federated.py --set federated.reuse_clients=false  # fresh modules

Also reported: CPU seconds of the process for each side (steadier than wall time on a loaded
machine) and the optimiser steps each side took: at equal sample-epochs the clients' smaller
splits need more, smaller batches than the pooled data (with batch 64: one step per client
and epoch against ceil(N/64) pooled), and a model whose step has a large fixed cost pays it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from mer.data.sources import load_samples
from mer.federated.loop import FederatedRun, make_clients
from mer.federated.partition import ClientData
from mer.run import CONFIG_DIR


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="fed_psyau")
    parser.add_argument("--model", default=None, help="model config (default: the experiment's)")
    parser.add_argument("--federated", default=None, help="federated config (rule)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--preset", default="default", help="SynME preset: default | tiny")
    parser.add_argument("--workers", type=int, default=1,
                        help="federated.workers: clients trained at once (processes)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another config override, e.g. federated.reuse_clients=false "
                             "(the fresh-module path); repeatable")
    args = parser.parse_args(argv)

    overrides = [f"+experiment={args.experiment}", f"data.preset={args.preset}",
                 f"federated.rounds={args.rounds}", f"federated.local_epochs={args.local_epochs}",
                 "federated.baselines=false", "progress=false",
                 f"federated.workers={args.workers}"]
    if args.model:
        overrides.append(f"model={args.model}")
    if args.federated:
        overrides.append(f"federated={args.federated}")
    overrides += args.set
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=overrides)
    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    samples = load_samples(cfg.data, os.path.expanduser(cfg.paths.cache_dir))
    clients = make_clients(cfg, samples)
    run = FederatedRun(cfg, samples, clients)

    steps: list[int] = []  # optimiser steps of the updates the server got
    local_updates = run._local_updates

    def counting(rnd: int, chosen: list[int]):
        updates, faults = local_updates(rnd, chosen)
        steps.extend(u.steps for u in updates)
        return updates, faults

    run._local_updates = counting
    t0, c0 = time.perf_counter(), time.process_time()
    stats = [run.round(rnd) for rnd in range(1, args.rounds + 1)]
    t_fed, c_fed = time.perf_counter() - t0, time.process_time() - c0
    run.close()
    fed_eval = run.evaluate()

    epochs = args.rounds * args.local_epochs
    pooled = ClientData("pooled", np.concatenate([c.train_idx for c in clients]),
                        np.array([], dtype=np.int64))
    t0, c0 = time.perf_counter(), time.process_time()
    central, central_steps = run.fit(run.initial_weights, pooled, epochs, run.seed + 1)
    t_central, c_central = time.perf_counter() - t0, time.process_time() - c0
    fed_steps = sum(steps)
    central_eval = run.evaluate({"central": lambda c: central})

    figures = {
        "synthetic": samples.synthetic, "model": cfg.model.name, "rule": cfg.federated.name,
        "clients": len(clients), "rounds": args.rounds, "local_epochs": args.local_epochs,
        "workers": args.workers,
        "sample_epochs": int(epochs * len(pooled.train_idx)),
        "federated_s": round(t_fed, 2), "centralised_s": round(t_central, 2),
        "overhead": round(t_fed / t_central - 1.0, 4),
        # CPU seconds of this process (all threads): steadier than wall time on a loaded box
        "federated_cpu_s": round(c_fed, 2), "centralised_cpu_s": round(c_central, 2),
        "cpu_overhead": round(c_fed / c_central - 1.0, 4),
        # optimiser steps: clients' batches are smaller, so federated takes more of them
        "federated_steps": int(fed_steps), "centralised_steps": int(central_steps),
        "reuse_clients": bool(cfg.federated.get("reuse_clients", True)),
        "overrides": overrides,
        "client_s_per_round": round(float(np.mean([s["client_s"] for s in stats])), 3),
        "server_s_per_round": round(float(np.mean([s["server_s"] for s in stats])), 4),
        "bytes_per_client_per_round": stats[-1]["bytes_per_client"],
        "federated_uf1": round(fed_eval["pooled_global"]["uf1"], 4),
        "federated_personalised_uf1": round(fed_eval["pooled_personalised"]["uf1"], 4),
        "centralised_uf1": round(central_eval["pooled_central"]["uf1"], 4),
        "load_average": os.getloadavg(),
    }
    print(f"{'(SYNTHETIC data) ' if samples.synthetic else ''}{cfg.model.name}, "
          f"{cfg.federated.name}, {len(clients)} clients ({args.workers} at once), "
          f"{args.rounds} rounds x {args.local_epochs} local epochs = "
          f"{figures['sample_epochs']} sample-epochs")
    print(f"  federated   {t_fed:8.2f} s   UF1 {figures['federated_uf1']:.4f} (global), "
          f"{figures['federated_personalised_uf1']:.4f} (personalised)")
    print(f"  centralised {t_central:8.2f} s   UF1 {figures['centralised_uf1']:.4f}")
    print(f"  overhead {100 * figures['overhead']:+.1f}% (target <= +10%); server "
          f"{1000 * figures['server_s_per_round']:.1f} ms/round; "
          f"{figures['bytes_per_client_per_round'] / 1024:.0f} kB per client per round each way")
    print(f"  CPU time: federated {c_fed:.2f} s, centralised {c_central:.2f} s "
          f"({100 * figures['cpu_overhead']:+.1f}%); optimiser steps: federated "
          f"{figures['federated_steps']}, centralised {figures['centralised_steps']}")
    print(f"  load average {figures['load_average']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
