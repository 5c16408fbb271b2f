"""Run mer's Flower apps on this machine: real Flower processes on 127.0.0.1.

``python -m mer.federated.flower_local`` starts one ``flower-superlink`` and one
``flower-supernode`` per client (``partition-id=0..N-1``), submits the app with ``flwr run``,
waits for the run to finish and stops every process it started. ``--simulation`` starts a
SuperLink in Flower's simulation mode instead (Ray's engine, ``num-supernodes=N``) and no
SuperNodes. The same commands, run by hand on several machines, are in README ("Running
across institutions").

Examples::

    python -m mer.federated.flower_local --clients 2 --out-dir outputs/flower
    python -m mer.federated.flower_local --clients 3 --simulation \\
        --overrides "federated=fedavg model=ststnet data.preset=tiny federated.num_clients=3"
    python -m mer.federated.flower_local --clients 3 --secure \\
        --overrides "+experiment=fed_psyau data.preset=tiny privacy=ckks"

Under ``privacy=ckks`` without key files in the overrides, the key pair is made in
``WORKDIR/keys`` and handed out as a real federation would: the public context to the
server, the secret one to each SuperNode.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[3]  # the repo root: pyproject.toml's [tool.flwr.app]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalFederation:
    """A SuperLink and ``clients`` SuperNodes (or a simulation SuperLink) on 127.0.0.1.

    Every process runs in its own session so that :meth:`stop` ends it with its children
    (SuperExec, ServerApp and ClientApp processes); use it as a context manager.
    """

    def __init__(self, workdir: Path, clients: int, simulation: bool = False,
                 node_overrides: list[str] | None = None, secure: bool = False,
                 worker_idle_s: float = 0.0) -> None:
        self.workdir = Path(workdir)
        self.worker_idle_s = float(worker_idle_s)  # > 0: each SuperNode's warm worker
        self.clients, self.simulation, self.secure = int(clients), simulation, secure
        self.node_overrides = node_overrides or [""] * self.clients
        self.port = free_port()
        path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # flower-superexec & co
        self.env = {**os.environ, "PATH": path, "FLWR_HOME": str(self.workdir / "flwr_home"),
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen] = []
        self._logs: list = []

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 (closed in stop())
        self._logs.append(log)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.workdir, start_new_session=True)

    def start(self) -> LocalFederation:
        """Start the processes and write the ``flwr`` connection ``mer-local``.

        ``secure``: TLS (a CA and a certificate for 127.0.0.1 made here) and SuperNode
        authentication (each SuperNode's key registered with ``flwr supernode register``).
        """
        home = self.workdir / "flwr_home"
        home.mkdir(parents=True, exist_ok=True)
        options = f"\noptions.num-supernodes = {self.clients}\n" if self.simulation else "\n"
        trust = f'root-certificates = "{self.workdir / "ca.crt"}"' if self.secure \
            else "insecure = true"
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "mer-local"\n\n[superlink.mer-local]\n'
            f'address = "127.0.0.1:{self.port}"\n{trust}{options}')
        link = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.secure:
            make_certificates(self.workdir)
            link += ["--ssl-ca-certfile", str(self.workdir / "ca.crt"), "--ssl-certfile",
                     str(self.workdir / "server.pem"), "--ssl-keyfile",
                     str(self.workdir / "server.key"), "--enable-supernode-auth"]
        else:
            link += ["--insecure"]
        self.superlink = self._spawn("superlink", link + (["--simulation"] if self.simulation
                                                          else []))
        self._wait_port(self.port)
        if not self.simulation:
            for i in range(self.clients):
                if self.secure:
                    self.flwr("supernode", "register", str(node_key(self.workdir, i)),
                              "mer-local")
                self.supernodes.append(self._spawn(f"supernode{i}", self.supernode_cmd(i)))
        return self

    def supernode_cmd(self, i: int, partition_id: int | None = None) -> list[str]:
        """The ``flower-supernode`` command line of client ``i`` (key ``node{i}.key``; its
        state and config cache in ``node{i}/``, so a restarted SuperNode resumes)."""
        config = f"partition-id={i if partition_id is None else partition_id}"
        config += f" state-dir={json.dumps(str(self.workdir / f'node{i}'))}"  # durable state
        if self.worker_idle_s > 0:
            config += f" worker-idle-s={self.worker_idle_s}"
        if self.node_overrides[i % self.clients]:
            config += f" overrides={json.dumps(self.node_overrides[i % self.clients])}"
        trust = ["--root-certificates", str(self.workdir / "ca.crt"),
                 "--auth-supernode-private-key", str(self.workdir / f"node{i}.key")] \
            if self.secure else ["--insecure"]
        return [str(BIN / "flower-supernode"), *trust, "--superlink",
                f"127.0.0.1:{self.port}", "--port", str(free_port()), "--node-config", config]

    def start_unregistered_supernode(self, partition_id: int = 0) -> subprocess.Popen:
        """A SuperNode with a key the SuperLink does not know (``secure``: it is refused)."""
        i = len(self.supernodes)
        node_key(self.workdir, i)
        self.supernodes.append(self._spawn(f"supernode{i}",
                                           self.supernode_cmd(i, partition_id)
                                           + ["--max-retries", "3"]))
        return self.supernodes[-1]

    def _wait_port(self, port: int, timeout_s: float = 60.0) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.superlink is not None and self.superlink.poll() is not None:
                raise RuntimeError("flower-superlink exited: "
                                   + (self.workdir / "superlink.log").read_text()[-2000:])
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"flower-superlink did not listen on 127.0.0.1:{port}")

    def flwr(self, *args: str, timeout_s: float = 120.0) -> str:
        proc = subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True,
                              env=self.env, cwd=APP_DIR, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def submit(self, run_config: dict) -> int:
        """``flwr run . mer-local -c ...``: the run's id."""
        pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        out = self.flwr("run", str(APP_DIR), "mer-local", "--run-config", pairs,
                        "--format", "json")
        return int(json.loads(out)["run-id"])

    def status(self, run_id: int) -> str:
        out = json.loads(self.flwr("ls", "mer-local", "--run-id", str(run_id), "--format",
                                   "json"))
        return str(out["runs"][0]["status"])

    def wait(self, run_id: int, timeout_s: float = 1800.0) -> str:
        """Poll until the run is finished; its final status (``finished:completed`` ...)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            status = self.status(run_id)
            if status.startswith("finished"):
                return status
            time.sleep(2.0)
        raise TimeoutError(f"run {run_id} not finished after {timeout_s:.0f} s")

    def server_log(self, run_id: int) -> str:
        """The ServerApp's log (``flwr log RUN_ID --show``), also saved as serverapp.log."""
        try:
            text = self.flwr("log", str(run_id), "mer-local", "--show")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            text = f"(no log: {e})"
        (self.workdir / "serverapp.log").write_text(text)
        return text

    def kill_supernode(self, i: int) -> None:
        """Kill client ``i``'s SuperNode and its ClientApp processes at once (SIGKILL)."""
        _kill(self.supernodes[i], signal.SIGKILL)

    def stop(self) -> None:
        for pidfile in self.workdir.glob("node*/worker.pid"):  # warm workers started here
            try:
                os.kill(int(pidfile.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
            pidfile.unlink(missing_ok=True)
        for proc in self.supernodes + ([self.superlink] if self.superlink else []):
            _kill(proc, signal.SIGTERM)
        for proc in self.supernodes + ([self.superlink] if self.superlink else []):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill(proc, signal.SIGKILL)
                proc.wait(timeout=10)
        for log in self._logs:
            log.close()

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def make_certificates(folder: Path) -> None:
    """``ca.crt`` and a server certificate ``server.pem``/``server.key`` for 127.0.0.1 and
    localhost, signed by it (what ``openssl`` makes in README's TLS example)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), \
        ec.generate_private_key(ec.SECP384R1())
    ca = cert("mer-ca", ca_key, "mer-ca", ca_key, ca=True)
    server = cert("localhost", server_key, "mer-ca", ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(server.public_bytes(pem))
    (folder / "server.key").write_bytes(server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def node_key(folder: Path, i: int) -> Path:
    """SuperNode ``i``'s EC key pair in OpenSSH format (``ssh-keygen -t ecdsa -b 384``):
    ``node{i}.key`` and ``node{i}.key.pub``; returns the public key's path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    (folder / f"node{i}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    public = folder / f"node{i}.key.pub"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return public


def with_ckks_keys(overrides: str, clients: int, folder: Path) -> tuple[str, list[str]]:
    """Under ``privacy=ckks`` without key files given: make the pair in ``folder``, the
    server's public one into the run's overrides, the secret one into every SuperNode's
    (what the labs of a real federation do by hand: README)."""
    import shlex

    items = shlex.split(overrides)
    if "privacy=ckks" not in items or any(i.startswith("privacy.public_context=")
                                          for i in items):
        return overrides, [""] * clients
    from mer.privacy.encrypted import CKKSParams, write_key_files

    secret, public = write_key_files(CKKSParams(), folder)
    return (f"{overrides} privacy.public_context={public}",
            [f"privacy.secret_context={secret}"] * clients)


def _kill(proc: subprocess.Popen, sig: int) -> None:
    """Signal ``proc`` and all its descendants (SuperExec, ServerApp, ClientApp processes;
    some of them detach into sessions of their own)."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in [proc, *family]:
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            pass


def _file_in_the_way(folder: str | None) -> Path | None:
    """The first existing non-folder on the way to ``folder`` (None: the folder can be made)."""
    if folder is None:
        return None
    path = Path(folder).resolve()
    for part in [path, *path.parents]:
        if part.exists():
            return None if part.is_dir() else part
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=2, help="SuperNodes (one per client)")
    p.add_argument("--overrides", default="+experiment=fed_psyau data.preset=tiny",
                   help="Hydra overrides of mer's config (quoted)")
    p.add_argument("--out-dir", default="outputs/flower", help="results folder")
    p.add_argument("--workdir", default=None, help="logs and FLWR_HOME (default: out-dir)")
    p.add_argument("--simulation", action="store_true", help="Flower's simulation engine")
    p.add_argument("--secure", action="store_true",
                   help="TLS and SuperNode authentication (certificates and keys made here)")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="whole-run limit")
    p.add_argument("--worker-idle-s", type=float, default=0.0,
                   help="> 0: each SuperNode's messages are answered by a warm worker process "
                        "that exits after this long idle (mer.federated.flower.worker)")
    args = p.parse_args(argv)
    if args.clients < 1:
        p.error(f"--clients {args.clients}: give at least 1 SuperNode (one per client)")
    for flag, value in (("--timeout-s", args.timeout_s), ("--worker-idle-s", args.worker_idle_s)):
        if not value >= 0:  # (also NaN)
            p.error(f"{flag} {value}: must be a number of seconds >= 0")
    for flag, value in (("--out-dir", args.out_dir), ("--workdir", args.workdir)):
        blocked = _file_in_the_way(value)
        if blocked:
            p.error(f"{flag} {value}: {blocked} is a file, not a folder; give a folder path")
    from mer.config_check import ConfigError
    from mer.federated.flower_app import compose_config

    try:  # the run's config checked here first: nothing is started for a bad value
        compose_config(args.overrides)
    except ConfigError as e:
        print(f"mer: {e}", file=sys.stderr)
        return 2
    out = Path(args.out_dir).resolve()
    work = Path(args.workdir).resolve() if args.workdir else out / "flower"
    work.mkdir(parents=True, exist_ok=True)
    overrides, node_overrides = with_ckks_keys(args.overrides, args.clients, work / "keys")
    with LocalFederation(work, args.clients, args.simulation, node_overrides,
                         secure=args.secure, worker_idle_s=args.worker_idle_s) as fed:
        run_id = fed.submit({"overrides": overrides, "out-dir": str(out)})
        print(f"run {run_id} submitted to 127.0.0.1:{fed.port}; logs in {work}")
        status = fed.wait(run_id, args.timeout_s)
        fed.server_log(run_id)
    print(f"run {run_id}: {status}; results in {out}")
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
