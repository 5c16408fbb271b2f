"""A SuperNode's warm worker: one long-lived process that answers the node's messages.

Flower starts a fresh ClientApp process for every message; the training code alone (torch,
Lightning) takes seconds to import, and the node's model must be built again each time. With
``worker-idle-s=N`` (N > 0) and a ``state-dir`` in the SuperNode's node config, the ClientApp
process (which imports only Flower and numpy) hands each message to this worker over a Unix
socket in the state dir and returns its answer: the worker keeps the node's config, samples
and model in memory between messages, and exits after N seconds without one. The worker runs
the very same handlers (:mod:`.client_app`), one message at a time, with the message's
``context.state`` sent along and sent back, so a run gives the same result with or without it
(and the node's state is still written to the state dir after every message).

The socket is ``<state-dir>/worker.sock``, guarded by a random key in ``<state-dir>/worker.key``
(readable by the node's user only); the worker's log is ``<state-dir>/worker.log``, its process
id ``<state-dir>/worker.pid``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import Client, Listener
from pathlib import Path

from flwr.app import Context, Message, RecordDict

IN_WORKER = False  # True in the worker process: the handlers answer here


def worker_idle_s(context: Context) -> float:
    """``worker-idle-s`` of the node config (0: no worker); it needs a ``state-dir``."""
    config = dict(context.node_config)
    idle = float(config.get("worker-idle-s", 0) or 0)
    if idle > 0 and config.get("state-dir") in (None, ""):
        raise ValueError("node config worker-idle-s needs a state-dir too (where the worker's "
                         "socket lives): add state-dir=\"PATH\" to --node-config")
    return idle


def _paths(context: Context) -> tuple[Path, Path, Path]:
    root = Path(str(dict(context.node_config)["state-dir"])).expanduser().resolve()
    sock = root / "worker.sock"
    if len(str(sock)) > 100:  # a Unix socket's path is limited to ~107 bytes
        digest = hashlib.sha256(str(root).encode()).hexdigest()[:16]
        sock = Path(tempfile.gettempdir()) / f"mer-worker-{digest}.sock"
    return sock, root / "worker.key", root / "worker.log"


def _key(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    return path.read_bytes()


def forward(msg: Message, context: Context, timeout_s: float = 600.0) -> Message:
    """Answer ``msg`` through the node's worker (started here if none is listening)."""
    sock, keyfile, logfile = _paths(context)
    key = _key(keyfile)
    conn = None
    try:
        conn = Client(str(sock), family="AF_UNIX", authkey=key)
    except (FileNotFoundError, ConnectionRefusedError):
        _start(sock, keyfile, logfile, worker_idle_s(context))
        t0 = time.monotonic()
        while conn is None:
            try:
                conn = Client(str(sock), family="AF_UNIX", authkey=key)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"the node's worker did not start within {timeout_s:.0f} "
                                       f"s: see {logfile}") from None
                time.sleep(0.2)
    with conn:
        conn.send((msg.metadata.message_type, msg.content,
                   Context(run_id=context.run_id, node_id=context.node_id,
                           node_config=dict(context.node_config), state=context.state,
                           run_config=dict(context.run_config))))
        ok, content, state = conn.recv()
    if not ok:
        raise RuntimeError(f"(node worker) {content}")
    for key_ in list(context.state):
        del context.state[key_]
    for key_, record in state.items():
        context.state[key_] = record
    return Message(content, reply_to=msg)


def _start(sock: Path, keyfile: Path, logfile: Path, idle_s: float) -> None:
    """Start the worker, detached (its own session), unless another message started one."""
    import fcntl

    with open(keyfile.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:  # someone else may have started it meanwhile
            Client(str(sock), family="AF_UNIX", authkey=_key(keyfile)).close()
            return
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        if sock.exists():
            sock.unlink()  # a dead worker's socket
        with open(logfile, "a") as log:
            subprocess.Popen([sys.executable, "-m", "mer.federated.flower.worker", "--socket",
                              str(sock), "--key", str(keyfile), "--idle-s", str(idle_s)],
                             stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        t0 = time.monotonic()
        while not sock.exists() and time.monotonic() - t0 < 600:
            time.sleep(0.1)


def serve(sock: Path, keyfile: Path, idle_s: float) -> None:
    """Answer messages on ``sock`` one at a time until ``idle_s`` pass without one."""
    global IN_WORKER
    IN_WORKER = True
    from flwr.supercore.task_identity import TaskIdentity

    import mer.federated.loop  # noqa: F401  (the training code, loaded once, up front)
    from mer.federated.flower import client_app as app

    listener = Listener(str(sock), family="AF_UNIX",
                        authkey=_key(keyfile))
    last = [time.monotonic()]
    busy = threading.Lock()

    def watchdog() -> None:
        while True:
            time.sleep(min(1.0, idle_s))
            with busy:
                if time.monotonic() - last[0] > idle_s:
                    sock.unlink(missing_ok=True)
                    os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    keyfile.with_name("worker.pid").write_text(str(os.getpid()))
    print(f"worker {os.getpid()} listening on {sock}", flush=True)
    while True:
        conn = listener.accept()
        with busy, conn:
            kind, content, context = conn.recv()
            TaskIdentity.run_id, TaskIdentity.task_id = context.run_id, 1
            TaskIdentity.node_id = context.node_id
            msg = Message(content, dst_node_id=context.node_id, message_type=kind)
            try:
                reply = app.client_app(msg, context)
                answer = (True, reply.content, context.state) if not reply.has_error() else \
                    (False, reply.error.reason, RecordDict())
            except Exception as e:  # the ClientApp process raises it: an error reply
                traceback.print_exc()
                answer = (False, f"{type(e).__name__}: {e}", RecordDict())
            conn.send(answer)
            last[0] = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", required=True, help="the Unix socket to listen on")
    p.add_argument("--key", required=True, help="the file holding the socket's key")
    p.add_argument("--idle-s", type=float, default=600.0, help="exit after this long idle")
    args = p.parse_args(argv)
    serve(Path(args.socket), Path(args.key), args.idle_s)
    return 0


if __name__ == "__main__":  # through the imported module: its IN_WORKER is what the handlers see
    from mer.federated.flower import worker

    sys.exit(worker.main())
