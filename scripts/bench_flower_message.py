"""What one Flower message costs a mer SuperNode: a fresh ClientApp process per message.

Flower's deployment (and simulation) engine starts a new ClientApp process for every message
a SuperNode receives, so each ``query`` / ``train`` / ``evaluate`` pays for the process's
imports, the config compose, the lab's data and the model before it does its work. This
script reproduces exactly that on this machine: one fresh ``python`` process per message,
calling mer's ``client_app`` with the SuperNode's ``Context`` (node config, run config, and
the node state dir, as a restarted ClientApp process sees them), and breaks the wall time
down into:

    startup   interpreter start until the script runs (python itself)
    imports   importing the ClientApp module (flwr, and whatever it imports at module level)
    config    composing and checking the Hydra config
    data      the lab's samples (the node-local cache once written; else the flow cache)
    clients   making the partition (make_clients)
    model     building the node's FederatedRun (model, initial weights, privacy)
    work      the message's own work (describe / local training / predictions), the rest

The first (untimed) message fills the SynME/flow cache and the node cache. ``--loopback``
also runs a whole federation over real Flower processes on 127.0.0.1 (``flower_local``) and
reports its wall time per message. Figures are synthetic (SynME, ``data.preset=tiny``).

Example::

    python scripts/bench_flower_message.py --repeat 3 --json outputs/bench_flower.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OVERRIDES = ("federated=fedavg model=ststnet data.preset=tiny federated.num_clients=2 "
             "federated.rounds=1 federated.local_epochs=1 federated.eval_every=1 "
             "federated.baselines=false progress=false")
PHASES = ("startup", "imports", "config", "data", "clients", "model", "work")
KINDS = ("query", "train", "evaluate")


def _timed(owner, attr: str, phase: str, spent: dict) -> None:
    """Wrap ``owner.attr`` so that its wall time adds to ``spent[phase]``."""
    fn = getattr(owner, attr)

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - t0

    setattr(owner, attr, wrapper)


def child(kind: str, workdir: Path, overrides: str, t_start: float, warm: bool) -> dict:
    """One message in this (fresh) process, as a ClientApp process would serve it."""
    spent = {"startup": time.time() - t_start}
    t0 = time.perf_counter()
    try:
        from mer.federated.flower import client_app as app_module
        from mer.federated.flower import common as node_module
    except ImportError:  # before the split: one module held both sides
        from mer.federated import flower_app as app_module
        node_module = app_module
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    if not warm:  # every message imports the training code (torch, Lightning)
        import mer.federated.loop as loop
    spent["imports"] = time.perf_counter() - t0

    _timed(node_module, "compose_config", "config", spent)
    if hasattr(node_module, "node_samples"):
        _timed(node_module, "node_samples", "data", spent)
    else:
        import mer.data.sources
        _timed(mer.data.sources, "load_samples", "data", spent)
    _timed(node_module, "make_clients", "clients", spent)
    if not warm:  # (with the worker, all of it happens in the worker)
        cls = loop.FederatedRun
        init = cls.__init__

        def timed_init(self, *a, **kw):
            t = time.perf_counter()
            init(self, *a, **kw)
            spent["model"] = spent.get("model", 0.0) + time.perf_counter() - t

        cls.__init__ = timed_init

    node_config = {"partition-id": 0, "state-dir": str(workdir / "node0")}
    if warm:
        node_config["worker-idle-s"] = 300
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                      run_config={"overrides": overrides})
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    import numpy as np
    from flwr.app import ArrayRecord

    weights_file = workdir / "weights.npz"
    if kind == "query":
        content = RecordDict({"config": ConfigRecord({})})
    else:
        with np.load(weights_file) as f:
            weights = [f[f"w{i}"] for i in range(len(f.files))]
        arrays = ArrayRecord([np.ascontiguousarray(w) for w in weights])
        if kind == "train":
            content = RecordDict({"config": ConfigRecord({"client": _client(workdir), "round": 1,
                                                          "k": 0, "crash": False}),
                                  "global": arrays})
        else:
            content = RecordDict({"config": ConfigRecord({"models": 1}), "model-0": arrays})
    msg = Message(content, dst_node_id=1, message_type=kind)
    t0 = time.perf_counter()
    reply = app_module.client_app(msg, context)
    total = time.perf_counter() - t0
    if reply.has_error():
        raise RuntimeError(f"{kind}: {reply.error.reason}")
    spent["work"] = total - sum(spent.get(p, 0.0) for p in ("config", "data", "clients",
                                                             "model"))
    spent["wall"] = time.time() - t_start
    if not weights_file.exists():  # what the next messages need: the client's name, a model
        node = node_module.node_from_context(context)
        (workdir / "client.txt").write_text(node.client.name)
        np.savez(weights_file, **{f"w{i}": w for i, w in enumerate(node.run.initial_weights)})
    return {p: round(spent.get(p, 0.0), 3) for p in (*PHASES, "wall")}


def _client(workdir: Path) -> str:
    return (workdir / "client.txt").read_text()


def one_message(kind: str, workdir: Path, overrides: str, warm: bool = False) -> dict:
    """Run ``kind`` in a fresh process; its phases and its wall time (seconds, from the
    process's start to the reply: what the SuperNode waits)."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--workdir", str(workdir),
                           "--overrides", overrides, "--t-start", repr(t0)]
                          + (["--warm"] if warm else []),
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} message failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def loopback(overrides: str, workdir: Path) -> dict:
    """A whole run over real Flower processes on 127.0.0.1 (2 SuperNodes): wall time."""
    from mer.federated.flower_local import LocalFederation

    t0 = time.time()
    with LocalFederation(workdir / "flower", clients=2) as fed:
        run_id = fed.submit({"overrides": overrides, "out-dir": str(workdir / "out")})
        status = fed.wait(run_id, timeout_s=1800)
    wall = time.time() - t0
    # per client: query, train, evaluate (eval_every=1) = 3 messages; secagg adds more
    return {"status": status, "wall": round(wall, 1), "messages_per_node": 3,
            "per_message": round(wall / 3, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--overrides", default=OVERRIDES, help="Hydra overrides (quoted)")
    p.add_argument("--repeat", type=int, default=3, help="timed messages of each kind")
    p.add_argument("--kinds", default=",".join(KINDS), help="message types, comma-separated")
    p.add_argument("--loopback", action="store_true",
                   help="also a whole run over real Flower processes on 127.0.0.1")
    p.add_argument("--warm", action="store_true",
                   help="node config worker-idle-s=300: the node's warm worker answers")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--t-start", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, Path(args.workdir), args.overrides, args.t_start,
                               args.warm)))
        return 0
    with tempfile.TemporaryDirectory(prefix="mer-bench-flower-") as tmp:
        work = Path(tmp)
        print("warm-up (fills the flow cache and the node cache) ...", flush=True)
        first = one_message("query", work, args.overrides, args.warm)
        print("first    " + " ".join(f"{k}={first[k]:.2f}" for k in (*PHASES, "wall")))
        rows: dict[str, list[dict]] = {"first-query": [first]}
        for kind in args.kinds.split(","):
            rows[kind] = [one_message(kind, work, args.overrides, args.warm)
                          for _ in range(args.repeat)]
            best = min(rows[kind], key=lambda r: r["wall"])
            print(f"{kind:9s} " + " ".join(f"{k}={best[k]:.2f}" for k in (*PHASES, "wall")),
                  flush=True)
        out = {"synthetic": "synthetic (SynME), data.preset=tiny", "overrides": args.overrides,
               "command": " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
               "warm": args.warm, "cpus": os.cpu_count(), "load": os.getloadavg(),
               "messages": rows}
        log = work / "node0" / "worker.log"
        if args.warm and log.exists():  # stop the worker this bench started
            import re
            import signal

            for pid in re.findall(r"^worker (\d+) listening", log.read_text(), re.M):
                try:
                    os.kill(int(pid), signal.SIGTERM)
                except ProcessLookupError:
                    pass
        if args.loopback:
            out["loopback"] = loopback(args.overrides, work)
            print(f"loopback: {out['loopback']}", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
