#!/usr/bin/env python
"""Rerun mer's reliability cases (issue 12) as a careless or unlucky user would.

Each case sets up its input in a temporary folder and runs mer in a subprocess as a user does
(``python -m mer.run ...``, ``mer.prepare``, ``mer.collect``, ``mer.privacy.keys``; a reader
call for the sheet and flow-cache cases), then classifies what the user saw:

- OK: exit 0 and the case's own check of the outputs passes (e.g. UF1/UAR of results.json
  equal those recomputed from predictions.csv; a resumed run equals an uninterrupted one);
- clear error: exit non-zero, no Python traceback, and the message names what the case planted
  (the key, file, row or client: each case declares the strings that must appear);
- silent: exit 0 where an error was expected, or the case's check of the outputs fails;
- traceback: a ``Traceback (most recent call last)`` block on stdout/stderr (what mer.run shows
  for an exception it does not report itself; the detail says whether the message named the
  planted thing);
- unclear error: exit non-zero, no traceback, but the planted key/file/row is not named;
- unexpected error: a clean error exit where the case expected the run to succeed;
- hang: past the timeout, or processes of the run still alive 5 s after it ended;
- corrupted: mixed or half-written outputs (a temporary file left behind, results.json and
  .hydra/config.yaml from different runs, a half-written results.json);
- skipped: the case cannot run here (mounts need root), with the reason.

Reader cases (``sheet_*``, ``fc_*``) call the reader in a subprocess and show its documented
error (DatabaseError, FlowCacheError) as ``mer: <message>`` with exit 2, as an entry point
should; any other exception is left as a traceback. The ``run_*`` cases show what ``mer.run``
itself prints for the same inputs.

Disk full and read-only folders are real mounts when run as root (a small tmpfs; a read-only
bind mount); otherwise disk full is simulated with ``ulimit -f`` (EFBIG) and read-only cases
are skipped (chmod does not stop root, and without root there is no mount).

Writes ``reliability.md`` and ``reliability.json`` (and ``logs/<case>.log``) into ``--out``.

Examples::

    python scripts/reliability_cases.py                    # every case, 2 at a time (--jobs)
    python scripts/reliability_cases.py --only 'sheet_*inf*' --out /tmp/rel
    python scripts/reliability_cases.py --list
    python scripts/reliability_cases.py --cache /tmp/rel-cache   # keep SynME between reruns
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

OUTCOMES = ("OK", "clear error", "silent", "traceback", "unclear error", "unexpected error",
            "hang", "corrupted", "skipped")
TRACEBACK = "Traceback (most recent call last)"
PY = sys.executable

TINY = ("data.preset=tiny", "trainer.max_epochs=1", "data.prepared=false")
FED = ("+experiment=fed_psyau", "data.preset=tiny", "federated.rounds=1",
       "federated.local_epochs=1", "federated.baselines=false", "logger=csv",
       "data.prepared=false")
# the uninterrupted LOSO run that resumed runs are compared with (2 fold workers)
REF_LOSO = ("data.preset=tiny", "trainer.max_epochs=10", "protocol.workers=2",
            "data.prepared=false")
REF_FED = (*FED[:2], "federated.rounds=2", *FED[3:])
SHEET = "CASME2-coding.xlsx"
ROW = 3  # the sheet row the sheet cases plant their bad cell in (sub01 EP05_10)


# ------------------------------------------------------------------------------ processes


@dataclass
class Proc:
    """What one subprocess did."""

    cmd: list[str]
    rc: int | None = None
    out: str = ""
    err: str = ""
    seconds: float = 0.0
    timed_out: bool = False
    cpu: float = 0.0      # CPU seconds of the process and its waited-for children
    orphans: int = 0      # processes of its group still alive 5 s after it ended

    @property
    def text(self) -> str:
        return self.out + "\n" + self.err


class Skip(Exception):
    """The case cannot run here; the message says why."""


class FixtureError(Exception):
    """A shared input (a reference run) could not be made."""

    def __init__(self, name: str, proc: Proc) -> None:
        super().__init__(f"fixture {name} failed (exit {proc.rc})")
        self.proc = proc


def _group_alive(pgid: int) -> list[int]:
    """Pids (not zombies) whose process group is ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found


def _reap_group(pgid: int, grace: float = 5.0) -> int:
    """Wait up to ``grace`` s for the group to end; kill what is left; how many were left."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return 0
        time.sleep(0.25)
    left = _group_alive(pgid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    return len(left)


class Running:
    """A started subprocess in its own process group (so the whole run can be signalled)."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict, fsize: int | None = None) -> None:
        self.cmd, self.t0 = cmd, time.monotonic()
        self.status: int | None = None
        self.cpu = 0.0
        self._out = tempfile.TemporaryFile()
        self._err = tempfile.TemporaryFile()

        def child() -> None:
            # as from a terminal: Ctrl-C works even when this harness was started in the
            # background (a shell starts background jobs with SIGINT ignored, and an ignored
            # signal stays ignored across exec)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

        self.popen = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._out, stderr=self._err,
                                      stdin=subprocess.DEVNULL, start_new_session=True,
                                      preexec_fn=child)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def alive(self) -> bool:
        """Whether the process still runs (reaps it, with its CPU time, once it ended)."""
        if self.status is None:
            pid, status, usage = os.wait4(self.popen.pid, os.WNOHANG)
            if pid:
                self.status, self.cpu = status, usage.ru_utime + usage.ru_stime
        return self.status is None

    def wait(self, timeout: float) -> Proc:
        proc = Proc(self.cmd)
        deadline = self.t0 + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.alive():
            proc.timed_out = True
            self.signal(signal.SIGKILL)
            while self.alive():
                time.sleep(0.05)
        self.popen.returncode = proc.rc = os.waitstatus_to_exitcode(self.status)
        proc.seconds, proc.cpu = time.monotonic() - self.t0, self.cpu
        proc.orphans = _reap_group(self.popen.pid, 0.5 if proc.timed_out else 5.0)
        for f, attr in ((self._out, "out"), (self._err, "err")):
            f.seek(0)
            setattr(proc, attr, f.read().decode("utf-8", "replace"))
            f.close()
        return proc


# ------------------------------------------------------------------------------ context


class Ctx:
    """Shared state of one harness run: folders, the shared cache, memoised fixtures."""

    def __init__(self, work: Path, cache: Path, timeout: float | None, logs: Path) -> None:
        self.work, self.cache, self.timeout, self.logs = work, cache, timeout, logs
        self.root = os.geteuid() == 0
        self._fixtures: dict[str, object] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def fixture(self, name: str, make: Callable[[], object]) -> object:
        """``make()`` once per harness run (its failure too is remembered)."""
        with self._lock:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self._fixtures:
                try:
                    self._fixtures[name] = make()
                except Exception as e:  # remembered: dependent cases report it
                    self._fixtures[name] = e
            value = self._fixtures[name]
        if isinstance(value, Exception):
            raise value
        return value


class CaseRun:
    """One case's folder, its subprocess helpers and what its checks found."""

    def __init__(self, ctx: Ctx, case: Case) -> None:
        self.ctx, self.case = ctx, case
        self.dir = ctx.work / "cases" / case.name
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.silent: list[str] = []
        self.corrupt: list[str] = []
        self.hang: list[str] = []
        self.notes: list[str] = []
        self.procs: list[Proc] = []
        self.cleanups: list[Callable[[], None]] = []

    # -- running
    def env(self, cache: Path | None = None) -> dict:
        env = dict(os.environ)
        env.pop("HYDRA_FULL_ERROR", None)
        env.update(MER_CACHE_DIR=str(cache or self.ctx.cache), WANDB_MODE="offline",
                   WANDB_SILENT="true", COLUMNS="120", PYTHONUNBUFFERED="1")
        return env

    def start(self, args: list[str], cache: Path | None = None, fsize: int | None = None
              ) -> Running:
        return Running([PY, *args], self.dir, self.env(cache), fsize)

    def timeout(self, factor: float = 1.0) -> float:
        return (self.ctx.timeout or self.case.timeout) * factor

    def finish(self, running: Running, factor: float = 1.0) -> Proc:
        proc = running.wait(self.timeout(factor))
        self.procs.append(proc)
        if proc.orphans:
            self.hang.append(f"{proc.orphans} process(es) of `{_short(proc.cmd)}` still running "
                             "5 s after it ended (killed)")
        return proc

    def py(self, args: list[str], cache: Path | None = None, fsize: int | None = None) -> Proc:
        return self.finish(self.start(args, cache, fsize))

    def mer_args(self, overrides: tuple | list, module: str = "mer.run",
                 run_dir: Path | None = None) -> list[str]:
        run_dir = run_dir or self.dir / "run"
        extra = [] if any(o.startswith("progress=") for o in overrides) else ["progress=false"]
        return ["-m", module, *overrides, *extra, f"hydra.run.dir={run_dir}"]

    def mer(self, *overrides: str, module: str = "mer.run", run_dir: Path | None = None,
            cache: Path | None = None, fsize: int | None = None) -> Proc:
        return self.py(self.mer_args(overrides, module, run_dir), cache, fsize)

    def mount(self, target: Path, *, tmpfs_kb: int | None = None, read_only_of: Path | None
              = None) -> None:
        """A small tmpfs at ``target``, or a read-only bind mount of ``read_only_of``; unmounted
        when the case ends. Skip when not root or mounts are refused."""
        if not self.ctx.root:
            raise Skip("needs root for a mount (chmod does not stop root; without root no mount)")
        target.mkdir(parents=True, exist_ok=True)
        cmds = ([["mount", "-t", "tmpfs", "-o", f"size={tmpfs_kb}k", "tmpfs", str(target)]]
                if tmpfs_kb else
                [["mount", "--bind", str(read_only_of), str(target)],
                 ["mount", "-o", "remount,ro,bind", str(target)]])
        for i, cmd in enumerate(cmds):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                if i:
                    subprocess.run(["umount", "-l", str(target)], capture_output=True)
                raise Skip(f"`{' '.join(cmd)}` refused: {r.stderr.strip()}")
            if i == 0:
                self.cleanups.append(
                    lambda t=target: subprocess.run(["umount", "-l", str(t)], capture_output=True))

    # -- checks
    def expect(self, ok: bool, problem: str) -> bool:
        """Record ``problem`` as a silent wrong result unless ``ok``."""
        if not ok:
            self.silent.append(problem)
        return ok


@dataclass
class Case:
    """One reliability case.

    ``body(c)`` sets up, runs mer and returns the process whose result the user sees; it
    records failed output checks with ``c.expect``/``c.silent``/``c.corrupt``. ``expect``:
    ``ok``, ``error`` or ``either`` (both are right answers). ``names``: for an error, strings
    the message must contain (``a|b``: either)."""

    name: str
    group: str
    expect: str
    body: Callable[[CaseRun], Proc]
    names: tuple[str, ...] = ()
    what: str = ""
    timeout: float = 120.0
    how: str = ""

    def __post_init__(self) -> None:
        assert self.expect in ("ok", "error", "either"), self.expect
        assert isinstance(self.names, tuple), f"{self.name}: names must be a tuple"


@dataclass
class Result:
    name: str
    group: str
    expect: str
    outcome: str
    detail: str
    what: str
    how: str = ""
    rc: int | None = None
    seconds: float = 0.0
    cpu: float = 0.0
    tail: str = ""
    commands: list[str] = field(default_factory=list)


def _short(cmd: list[str]) -> str:
    text = " ".join(c if c != PY else "python" for c in cmd)
    return text if len(text) <= 300 else text[:300] + " ..."


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _leftovers(folder: Path) -> list[str]:
    """Temporary files a writer left behind under ``folder``."""
    found = []
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f.endswith((".tmp", ".part")) or re.match(r"^tmp[a-z0-9_]{6,}$", f):
                found.append(str(Path(dirpath, f)))
    return found


def classify(case: Case, c: CaseRun, proc: Proc) -> tuple[str, str]:
    """(outcome, detail) of a case from its main process and its checks."""
    text = proc.text
    missing = [n for n in case.names if not any(alt in text for alt in n.split("|"))]
    named = f"names {list(case.names)}" if not missing else f"does not name {missing}"
    if proc.timed_out:
        return "hang", f"no answer after {proc.seconds:.0f} s (killed)"
    if c.hang:
        return "hang", "; ".join(c.hang)
    if c.corrupt:
        return "corrupted", "; ".join(c.corrupt)
    if proc.rc == 0:
        if case.expect == "error":
            return "silent", f"exit 0, but an error naming {list(case.names)} was expected"
        if c.silent:
            return "silent", "; ".join(c.silent)
        return "OK", "; ".join(c.notes) or "exit 0, outputs checked"
    if TRACEBACK in text:
        head = re.findall(r"^(\S*(?:Error|Exception|Interrupt)\b.*)$", text, re.M)
        last = head[-1][:200] if head else "(no exception line)"
        return "traceback", f"exit {proc.rc} with a traceback ({named}): {last}"
    if case.expect == "ok":
        return "unexpected error", f"exit {proc.rc}, the run was expected to succeed: " \
            f"{_tail(proc.err or proc.out, 3)}"
    if missing:
        return "unclear error", f"exit {proc.rc}, message {named}"
    if c.silent:  # an error, but what it left behind is wrong
        return "silent", "; ".join(c.silent)
    return "clear error", f"exit {proc.rc}, {named}"


def run_case(ctx: Ctx, case: Case) -> Result:
    c = CaseRun(ctx, case)
    proc = Proc([])
    try:
        proc = case.body(c)
        for f in _leftovers(c.dir):
            c.corrupt.append(f"temporary file left behind: {f}")
        outcome, detail = classify(case, c, proc)
    except Skip as e:
        outcome, detail = "skipped", str(e)
    except FixtureError as e:
        proc = e.proc
        fake = Case(case.name, case.group, "ok", case.body)
        outcome, detail = classify(fake, c, proc)
        detail = f"{e}: {detail}"
        if outcome == "OK":  # cannot happen, but never report a broken fixture as OK
            outcome = "unexpected error"
    except Exception:  # a bug of the harness itself: say so, never hide it
        outcome, detail = "unexpected error", "harness error: " + _tail(traceback.format_exc(), 6)
    finally:
        for undo in reversed(c.cleanups):
            with contextlib.suppress(Exception):
                undo()
    log = [f"# {case.name} ({case.group}) expect={case.expect} -> {outcome}: {detail}"]
    for p in c.procs:
        log += [f"\n$ {_short(p.cmd)}\n# exit {p.rc} in {p.seconds:.1f} s ({p.cpu:.1f} s CPU)"
                + (" TIMED OUT" if p.timed_out else ""), "## stdout", p.out, "## stderr", p.err]
    (ctx.logs / f"{case.name}.log").write_text("\n".join(log))
    total = sum(p.seconds for p in c.procs)
    cpu = sum(p.cpu for p in c.procs)
    return Result(case.name, case.group, case.expect, outcome, detail, case.what, case.how,
                  proc.rc, round(total, 1), round(cpu, 1), _tail(proc.err or proc.out),
                  [_short(p.cmd) for p in c.procs])


# ------------------------------------------------------------------------------ fixtures


def _copytree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` as a new file at ``path`` (never through a hard link to a shared copy)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def synme_root(c: CaseRun) -> Path:
    """The tiny SynME in the shared cache (generated once)."""
    def make() -> Path:
        code = ("import sys; from pathlib import Path; "
                "from mer.data.synthetic import ensure_synme, tiny_synme_config; "
                "print(ensure_synme(tiny_synme_config(seed=0), Path(sys.argv[1]) / 'synme'))")
        proc = c.py(["-c", code, str(c.ctx.cache)])
        if proc.rc:
            raise FixtureError("synme", proc)
        return Path(proc.out.strip().splitlines()[-1])
    return c.ctx.fixture("synme", make)


def ref_run(c: CaseRun, name: str, overrides: tuple) -> Path:
    """A finished run in the shared fixtures folder (made once)."""
    def make() -> Path:
        run_dir = c.ctx.work / "fixtures" / name
        shutil.rmtree(run_dir, ignore_errors=True)
        proc = c.finish(c.start(c.mer_args(overrides, run_dir=run_dir)), 3)
        if proc.rc or not (run_dir / "results.json").exists():
            raise FixtureError(name, proc)
        return run_dir
    synme_root(c)
    return c.ctx.fixture(name, make)


def ref_loso(c: CaseRun) -> Path:
    return ref_run(c, "ref_loso", REF_LOSO)


def ref_fed(c: CaseRun) -> Path:
    return ref_run(c, "ref_fed", REF_FED)


def private_cache(c: CaseRun, flow: bool = True) -> Path:
    """A copy of the shared cache for a case that damages it: SynME (and the flow entries)."""
    root = synme_root(c)
    if flow:
        ref_loso(c)  # fills the flow entries of the tiny preset
    cache = c.dir / "cache"
    _copytree(root, cache / "synme" / root.name)
    if flow:
        _copytree(c.ctx.cache / "flow", cache / "flow")
    return cache


def casme2_base(c: CaseRun) -> Path:
    """tinyA of SynME as a CASME II release (emotion words CASME II's own), shared read-only."""
    def make() -> Path:
        import openpyxl

        base = c.ctx.work / "fixtures" / "casme2"
        shutil.rmtree(base, ignore_errors=True)
        _copytree(synme_root(c) / "tinyA", base)
        wb = openpyxl.load_workbook(base / SHEET)
        ws = wb.active
        for row in ws.iter_rows(min_row=2):
            if row[8].value == "anger":
                row[8].value = "disgust"
        _save(wb, base / SHEET)
        return base
    return c.ctx.fixture("casme2", make)


def _save(wb, path: Path) -> None:
    path.unlink(missing_ok=True)
    wb.save(path)


def casme2_copy(c: CaseRun, plant: dict | None = None) -> Path:
    """A CASME II tree of the case (frames hard-linked), ``plant`` {(row, col): value} set in
    its sheet (``None`` clears a cell)."""
    import openpyxl

    base = casme2_base(c)
    root = c.dir / "CASME2"
    shutil.copytree(base, root, copy_function=os.link)
    if plant:
        wb = openpyxl.load_workbook(base / SHEET)
        ws = wb.active
        for (r, col), v in plant.items():
            ws.cell(row=r, column=col).value = v
        _save(wb, root / SHEET)
    return root


def samm_copy(c: CaseRun, objective: object = None) -> Path:
    """A two-clip SAMM tree (frames of tinyA renamed), sheet row 3's objective set."""
    import openpyxl

    src = casme2_base(c) / "CASME2_RAW_selected"
    root = c.dir / "SAMM_root"
    rows = [(6, "006_1_2", src / "sub01" / "EP02_12f", 10, 29, 53, "1+25", "Disgust", 1),
            (6, "006_1_3", src / "sub01" / "EP05_10", 152, 167, 214, "4+7", "Anger", 2)]
    for subject, clip, frames, *_ in rows:
        folder = root / "SAMM" / f"{subject:03d}" / clip
        folder.mkdir(parents=True)
        for f in frames.iterdir():
            n = int(re.findall(r"\d+", f.stem)[-1])
            os.link(f, folder / f"{subject:03d}_{n:05d}.jpg")
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["Subject", "Filename", "Onset Frame", "Apex Frame", "Offset Frame",
               "Action Units", "Estimated Emotion", "Objective Classes"])
    for subject, clip, _, on, ap, off, au, emo, obj in rows:
        ws.append([subject, clip, on, ap, off, au, emo, obj])
    if objective is not None:
        ws.cell(row=3, column=8).value = objective
    wb.save(root / "SAMM_Micro_FACS_Codes_v2.xlsx")
    return root


def flowcache_copy(c: CaseRun, n_subjects: int = 4, classes: tuple = (0, 1, 2)) -> Path:
    """A flat flow cache (28x28 PNGs + CSV): ``n_subjects`` x 2 clips of each class."""
    import cv2
    import numpy as np

    root = c.dir / "flowcache"
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = ["dataset,sub,filename_o,label"]
    for s in range(1, n_subjects + 1):
        for label in classes:
            for k in range(2):
                clip = f"c{label}{k}"
                img = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
                img[..., 0] = np.clip(img[..., 0] // 2 + 60 * label, 0, 255)
                cv2.imwrite(str(root / f"s{s}_{clip} .png"), img)
                lines.append(f"fc,s{s},{clip},{label}")
    (root / "flowcache.csv").write_text("\n".join(lines) + "\n")
    return root


# ------------------------------------------------------------------------------ checks


def recompute_metrics(run_dir: Path) -> list[str]:
    """Problems found recomputing results.json's figures from predictions.csv."""
    import numpy as np
    import pandas as pd
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    res = json.loads((run_dir / "results.json").read_text())
    pred = pd.read_csv(run_dir / "predictions.csv")
    classes = res["data"]["class_names"] if "data" in res else None
    problems = []
    prob_cols = [col for col in pred.columns if col.startswith("p_")]
    probs = pred[prob_cols].to_numpy(float)
    if not np.isfinite(probs).all():
        problems.append("predictions.csv holds non-finite probabilities")
    elif not np.allclose(probs.sum(1), 1, atol=1e-4):
        problems.append("class probabilities do not sum to 1")
    elif (probs.argmax(1) != pred["prediction"].to_numpy()).any():
        problems.append("prediction is not the argmax of the probabilities")
    scopes = {"overall": pred}
    if "database" in pred:
        scopes.update({str(k): g for k, g in pred.groupby("database")})
    metrics = res.get("metrics", {})
    for scope, g in scopes.items():
        m = metrics.get("overall") if scope == "overall" else \
            metrics.get("per_database", {}).get(scope)
        if m is None:
            problems.append(f"results.json has no metrics for {scope}")
            continue
        y, p = g["label"].to_numpy(), g["prediction"].to_numpy()
        present = sorted(set(y))
        want = {"n": len(g), "uf1": f1_score(y, p, labels=present, average="macro",
                                             zero_division=0),
                "uar": recall_score(y, p, labels=present, average="macro", zero_division=0),
                "accuracy": accuracy_score(y, p)}
        for k, v in want.items():
            if not np.isclose(float(m[k]), v, atol=1e-9):
                problems.append(f"{scope} {k}: results.json {m[k]} != {v} from predictions.csv")
    if classes is not None and len(prob_cols) != len(classes):
        problems.append(f"{len(prob_cols)} probability columns for {len(classes)} classes")
    return problems


def same_run(a: Path, b: Path) -> list[str]:
    """Problems when run ``b`` differs from run ``a`` in predictions or figures."""
    problems = []
    pa, pb = (d / "predictions.csv" for d in (a, b))
    if not pb.exists():
        return [f"{pb} missing"]
    if pa.read_text() != pb.read_text():
        problems.append(f"{pb} differs from the uninterrupted run's {pa}")
    ma = json.loads((a / "results.json").read_text()).get("metrics")
    mb = json.loads((b / "results.json").read_text()).get("metrics")
    if ma != mb:
        problems.append("results.json metrics differ from the uninterrupted run's")
    return problems


def results_config(run_dir: Path) -> tuple[dict | None, dict | None]:
    """(results.json's config, .hydra/config.yaml), None where absent or unreadable."""
    import yaml

    res = hyd = None
    with contextlib.suppress(OSError, ValueError):
        res = json.loads((run_dir / "results.json").read_text()).get("config")
    with contextlib.suppress(OSError, ValueError, yaml.YAMLError):
        hyd = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    return res, hyd


def check_results_readable(c: CaseRun, run_dir: Path) -> None:
    """A results.json left in ``run_dir`` must be whole and agree with .hydra/config.yaml."""
    path = run_dir / "results.json"
    if not path.exists():
        return
    try:
        res = json.loads(path.read_text())
    except ValueError:
        c.corrupt.append(f"{path} is half-written (not valid JSON)")
        return
    _, hyd = results_config(run_dir)
    if hyd is not None and res.get("config", {}).get("seed") != hyd.get("seed"):
        c.corrupt.append(f"{path} and .hydra/config.yaml belong to different runs")


# ------------------------------------------------------------------------------ cases: config


def config_case(name: str, overrides: tuple, names: tuple, what: str, base: tuple = TINY,
                module: str = "mer.run", timeout: float = 90) -> Case:
    """A config mistake: a clear error naming the key, before any work (no results.json)."""
    def body(c: CaseRun) -> Proc:
        proc = c.mer(*base, *overrides, module=module)
        if proc.rc and (c.dir / "run" / "results.json").exists():
            c.corrupt.append("a failed run left a results.json")
        if (c.dir / "run" / ".mer.lock").exists():
            c.silent.append("the run left its .mer.lock behind (a later run warns of a stale "
                            "lock)")
        return proc
    return Case(name, "config", "error", body, names, what, timeout)


def config_cases() -> list[Case]:
    cases = [
        config_case("cfg_fed_rounds_0", ("federated.rounds=0",), ("federated.rounds",),
                    "federated.rounds=0 (was IndexError)", FED),
        config_case("cfg_max_epochs_-1", ("trainer.max_epochs=-1",), ("trainer.max_epochs",),
                    "trainer.max_epochs=-1 (was: runs for ever)"),
        config_case("cfg_max_epochs_0", ("trainer.max_epochs=0",), ("trainer.max_epochs",),
                    "trainer.max_epochs=0 (was: scores an untrained model)"),
        config_case("cfg_batch_size_0", ("data.batch_size=0",), ("data.batch_size",),
                    "data.batch_size=0 (was PyTorch traceback)"),
        config_case("cfg_fed_local_epochs_0", ("federated.local_epochs=0",),
                    ("federated.local_epochs",), "federated.local_epochs=0 (was: untrained)", FED),
        config_case("cfg_fed_min_clients_5", ("federated.min_clients=5",),
                    ("federated.min_clients",), "min_clients 5 > 2 clients (was accepted)", FED),
        config_case("cfg_fed_dropout_1.5", ("federated.faults.dropout=1.5",),
                    ("federated.faults.dropout",), "faults.dropout=1.5 (was accepted)", FED),
        config_case("cfg_select_val_uf1_no_val", ("protocol.select=val_uf1",),
                    ("protocol.select|protocol.val_subjects",),
                    "select=val_uf1 without validation subjects (was: last epoch, silently)"),
        config_case("cfg_select_bogus", ("protocol.select=best_test",), ("protocol.select",),
                    "protocol.select=best_test"),
        config_case("cfg_val_subjects_-1", ("protocol.val_subjects=-1",),
                    ("protocol.val_subjects",), "protocol.val_subjects=-1"),
        config_case("cfg_model_lr_-1", ("model.lr=-1",), ("model.lr",), "model.lr=-1"),
        config_case("cfg_fed_fraction_1.5", ("federated.fraction=1.5",),
                    ("federated.fraction",), "federated.fraction=1.5", FED),
        config_case("cfg_fed_straggler_prob_2",
                    ("federated.faults.stragglers.probability=2",),
                    ("federated.faults.stragglers.probability",), "straggler probability 2",
                    FED),
        config_case("cfg_fed_num_clients_50", ("federated.partition.kind=iid",
                                               "federated.num_clients=50"),
                    ("federated.num_clients",), "50 clients from 8 subjects", FED),
        config_case("cfg_fed_dirichlet_alpha_0", ("federated.partition.kind=dirichlet",
                                                  "federated.partition.alpha=0"),
                    ("federated.partition.alpha",), "Dirichlet alpha 0", FED),
        config_case("cfg_fed_test_fraction_1", ("federated.partition.test_fraction=1.0",),
                    ("federated.partition.test_fraction",), "test_fraction 1 (no training)",
                    FED),
        config_case("cfg_fed_crash_unknown_client",
                    ("federated.faults.crash=[{client: nosuch, round: 1}]",),
                    ("nosuch",), "a crash fault naming a client that does not exist", FED),
        config_case("cfg_fed_byzantine_unknown_client",
                    ("federated.faults.byzantine.clients=[nosuch]",), ("nosuch",),
                    "a Byzantine client that does not exist", FED),
        config_case("cfg_trimmed_beta_0.6", ("federated=trimmed_mean",
                                             "federated.rule.beta=0.6"),
                    ("federated.rule.beta",), "trimmed mean beta 0.6 (>= 0.5 trims all)", FED),
        config_case("cfg_krum_malicious_5", ("federated=krum", "federated.rule.num_malicious=5"),
                    ("num_malicious",), "Krum tolerating 5 of 2 clients", FED),
        config_case("cfg_ckks_with_median", ("privacy=ckks", "federated=median"),
                    ("median",), "a rule that needs individual updates under CKKS", FED),
        config_case("cfg_dp_noise_-1", ("privacy=dp", "privacy.noise_multiplier=-1"),
                    ("privacy.noise_multiplier",), "DP noise multiplier -1", FED),
        config_case("cfg_on_error_ignore", ("data.on_error=ignore",), ("data.on_error",),
                    "data.on_error=ignore"),
        config_case("cfg_label_scheme_bogus", ("data.label_scheme=bogus",),
                    ("data.label_scheme",), "an unknown label scheme"),
        config_case("cfg_flow_method_bogus", ("data.flow.method=bogus",), ("data.flow.method",),
                    "an unknown flow method"),
        config_case("cfg_flow_out_size_0", ("data.flow.out_size=0",), ("data.flow.out_size",),
                    "data.flow.out_size=0"),
        config_case("cfg_preset_huge", ("data.preset=huge",), ("data.preset",),
                    "an unknown SynME preset", base=TINY[1:]),
        config_case("cfg_model_unknown", ("model=nosuchnet",), ("nosuchnet",),
                    "model=nosuchnet (Hydra's own error)"),
        config_case("cfg_protocol_workers_0", ("protocol.workers=0",), ("protocol.workers",),
                    "protocol.workers=0"),
        config_case("cfg_fold_index_99", ("protocol.fold_index=99",), ("fold_index",),
                    "fold 99 of 8 (known only once the data is read)"),
        config_case("cfg_resume_maybe", ("resume=maybe",), ("resume",), "resume=maybe"),
        config_case("cfg_prepare_margin_-1", ("data.face.margin=-1",), ("data.face.margin",),
                    "mer.prepare data.face.margin=-1", base=("data.preset=tiny",),
                    module="mer.prepare"),
        config_case("cfg_prepare_magnify_band", ("data.magnify.enabled=true",
                                                 "data.magnify.low_hz=20"),
                    ("data.magnify",), "mer.prepare with low_hz above high_hz",
                    base=("data.preset=tiny",), module="mer.prepare"),
        config_case("cfg_casme2_no_root", ("data=casme2",), ("data.root",),
                    "data=casme2 without data.root", base=("trainer.max_epochs=1",)),
    ]
    return cases


def fed_start_case(rule: str) -> Case:
    def body(c: CaseRun) -> Proc:
        synme_root(c)
        proc = c.mer(*FED, f"federated={rule}")
        if proc.rc == 0:
            res = json.loads((c.dir / "run" / "results.json").read_text())
            c.expect(res["config"]["federated"]["name"] == rule,
                     f"results.json says federated={res['config']['federated']['name']}")
            uf1 = res["federated"]["final"]["pooled_global"]["uf1"]
            c.expect(uf1 == uf1, "global UF1 is NaN")
        return proc
    return Case(f"run_fed_{rule}", "config", "ok", body, (),
                f"federated={rule} trains one round (was TypeError 'lr' at start)", 240)


# ------------------------------------------------------------------------------ cases: sheets


SHEET_READER = r"""
import json, sys
from mer.data.databases.common import DatabaseError
from mer.data.databases.registry import read_database
name, root, on_error = sys.argv[1:4]
try:
    table, skipped = read_database(name, root, on_error=on_error)
except DatabaseError as e:  # the readers' documented error, shown as an entry point would
    print(f"mer: {e}", file=sys.stderr)
    sys.exit(2)
cols = ["row", "subject", "clip", "onset", "apex", "offset", "objective"]
print(json.dumps({"table": table[cols].astype(str).to_dict("records"),
                  "aus": [list(map(int, a)) for a in table["aus"]], "skipped": skipped}))
"""

# sheet columns of the CASME II layout (1-based)
COL = {"subject": 1, "clip": 2, "onset": 4, "apex": 5, "offset": 6, "au": 8, "emotion": 9}

SHEET_DEFECTS = [  # (name, column, value, what)
    ("inf", "onset", "inf", "onset cell 'inf' (was OverflowError)"),
    ("1e400", "onset", "1e400", "onset cell '1e400' (was OverflowError)"),
    ("1e300_number", "onset", 1e300, "onset a finite number of 301 digits"),
    ("sup2_subject", "subject", "\u00b2", "subject '\u00b2' (was ValueError from int())"),
    ("circled1_subject", "subject", "\u2460", "subject '\u2460' (was ValueError)"),
    ("300_byte_clip", "clip", "E" * 300, "a 300-byte clip name (was OSError)"),
    ("slash_clip", "clip", "../sub02/EP10_06", "a clip name that is a path into another clip"),
    ("fraction_onset", "onset", 152.5, "fractional onset 152.5 (was truncated to 152)"),
    ("negative_offset", "offset", -5, "offset -5 (was read as 'to the last frame')"),
    ("negative_apex", "apex", -3, "apex -3 (was kept, excluded later with a wrong reason)"),
    ("offset_1e18", "offset", 10**18, "offset 10^18 (was never checked against the frames)"),
    ("offset_past_frames", "offset", 500, "offset 500, frames on disk end at 219"),
    ("apex_before_onset", "apex", 100, "apex 100 before onset 152"),
    ("au_-4", "au", -4, "numeric AU cell -4 (was parsed as an AU)"),
    ("au_1000", "au", 1000, "numeric AU cell 1000 (was parsed as an AU)"),
    ("emotion_unknown", "emotion", "joy", "an emotion CASME II does not have"),
    ("onset_blank", "onset", None, "no onset"),
]


def sheet_case(key: str, column: str, value: object, what: str, on_error: str) -> Case:
    def body(c: CaseRun) -> Proc:
        root = casme2_copy(c, {(ROW, COL[column]): value})
        proc = c.py(["-c", SHEET_READER, "casme2", str(root), on_error])
        if on_error == "skip" and proc.rc == 0:
            out = json.loads(proc.out.strip().splitlines()[-1])
            rows = [int(r["row"]) for r in out["table"]]
            c.expect(ROW not in rows, f"row {ROW} was accepted: "
                     f"{[r for r in out['table'] if int(r['row']) == ROW]}"
                     + (f" with AUs {out['aus'][rows.index(ROW)]}" if ROW in rows else ""))
            c.expect(len(rows) == 11, f"{len(rows)} rows kept, 11 expected (12 minus row {ROW})")
            c.expect(any(f"row {ROW}" in s["reason"] for s in out["skipped"]),
                     f"row {ROW} is not listed as skipped with its reason: {out['skipped']}")
        return proc
    expect = "error" if on_error == "raise" else "ok"
    names = (SHEET, f"row {ROW}") if on_error == "raise" else ()
    return Case(f"sheet_{key}_{on_error}", "sheet", expect, body, names,
                f"{what}; on_error={on_error}", 60)


def sheet_misc_cases() -> list[Case]:
    def dup(c: CaseRun) -> Proc:
        import openpyxl

        root = casme2_copy(c)
        wb = openpyxl.load_workbook(root / SHEET)
        ws = wb.active
        for j in range(1, 11):
            ws.cell(row=ROW, column=j).value = ws.cell(row=2, column=j).value
        _save(wb, root / SHEET)
        return c.py(["-c", SHEET_READER, "casme2", str(root), "raise"])

    def missing_column(c: CaseRun) -> Proc:
        import openpyxl

        root = casme2_copy(c)
        wb = openpyxl.load_workbook(root / SHEET)
        wb.active.cell(row=1, column=COL["onset"]).value = "Start"
        _save(wb, root / SHEET)
        return c.py(["-c", SHEET_READER, "casme2", str(root), "raise"])

    def garbage(c: CaseRun) -> Proc:
        root = casme2_copy(c)
        _replace(root / SHEET, b"this is not a spreadsheet\n" * 20)
        return c.py(["-c", SHEET_READER, "casme2", str(root), "raise"])

    def empty_file(c: CaseRun) -> Proc:
        root = casme2_copy(c)
        _replace(root / SHEET, b"")
        return c.py(["-c", SHEET_READER, "casme2", str(root), "skip"])

    def truncated_jpeg(on_error: str) -> Callable[[CaseRun], Proc]:
        def body(c: CaseRun) -> Proc:
            root = casme2_copy(c)
            frame = root / "CASME2_RAW_selected" / "sub01" / "EP05_10" / "img152.jpg"
            data = frame.read_bytes()
            _replace(frame, data[: len(data) // 2])
            proc = c.py(["-c", SHEET_READER, "casme2", str(root), on_error])
            if on_error == "skip" and proc.rc == 0:
                out = json.loads(proc.out.strip().splitlines()[-1])
                c.expect(ROW not in [int(r["row"]) for r in out["table"]],
                         "the clip with a truncated onset frame was accepted")
                c.expect(any("img152" in s["reason"] for s in out["skipped"]),
                         "the truncated frame is not named among the skipped")
            return proc
        return body

    samm = []
    for key, value in (("circled1", "\u2460"), ("8", 8), ("VIII", "VIII")):
        for on_error in ("raise", "skip"):
            def body(c: CaseRun, value=value, on_error=on_error) -> Proc:
                root = samm_copy(c, value)
                proc = c.py(["-c", SHEET_READER, "samm", str(root), on_error])
                if on_error == "skip" and proc.rc == 0:
                    out = json.loads(proc.out.strip().splitlines()[-1])
                    c.expect([int(r["row"]) for r in out["table"]] == [2],
                             f"rows kept {[r['row'] for r in out['table']]}, expected only 2; "
                             f"objectives {[r['objective'] for r in out['table']]}")
                return proc
            samm.append(Case(f"sheet_samm_objective_{key}_{on_error}", "sheet",
                             "error" if on_error == "raise" else "ok", body,
                             ("SAMM_Micro_FACS_Codes_v2.xlsx", "row 3") if on_error == "raise"
                             else (), f"SAMM objective class {value!r}; on_error={on_error}", 60))
    return [
        Case("sheet_duplicate_row", "sheet", "error", dup, (SHEET, f"row {ROW}", "duplicate"),
             "a row repeated (same subject and clip)", 60),
        Case("sheet_missing_onset_column", "sheet", "error", missing_column, (SHEET, "onset"),
             "the onset column renamed 'Start'", 60),
        Case("sheet_not_a_spreadsheet", "sheet", "error", garbage, (SHEET,),
             "CASME2-coding.xlsx holds text, not a workbook", 60),
        Case("sheet_empty_file_skip", "sheet", "error", empty_file, (SHEET,),
             "CASME2-coding.xlsx of 0 bytes (on_error=skip cannot skip a whole sheet)", 60),
        Case("sheet_truncated_jpeg_raise", "sheet", "error", truncated_jpeg("raise"),
             ("img152.jpg",), "the onset JPEG cut in half (was read with a grey lower half)",
             60),
        Case("sheet_truncated_jpeg_skip", "sheet", "ok", truncated_jpeg("skip"), (),
             "the onset JPEG cut in half; on_error=skip lists it", 60),
        *samm,
    ]


def run_sheet_cases() -> list[Case]:
    """What mer.run itself shows for bad sheets and data folders."""
    def inf(on_error: str) -> Callable[[CaseRun], Proc]:
        def body(c: CaseRun) -> Proc:
            root = casme2_copy(c, {(ROW, COL["onset"]): "inf"})
            proc = c.mer("data=casme2", f"data.root={root}", f"data.on_error={on_error}",
                         "trainer.max_epochs=1")
            if on_error == "skip" and proc.rc == 0:
                res = json.loads((c.dir / "run" / "results.json").read_text())
                reasons = [e["reason"] for e in res["data"]["excluded"]]
                c.expect(any(f"row {ROW}" in r for r in reasons),
                         f"row {ROW} is not in results.json's excluded: {reasons}")
                c.expect(res["data"]["n_samples"] == 10,
                         f"{res['data']['n_samples']} samples, 10 expected (12 - row 3 - "
                         "one 'others')")
                c.silent += recompute_metrics(c.dir / "run")
            return proc
        return body

    def header_only(c: CaseRun) -> Proc:
        import openpyxl

        root = casme2_copy(c)
        wb = openpyxl.load_workbook(root / SHEET)
        wb.active.delete_rows(2, 20)
        _save(wb, root / SHEET)
        return c.mer("data=casme2", f"data.root={root}", "trainer.max_epochs=1")

    def root_is_file(c: CaseRun) -> Proc:
        f = c.dir / "CASME2.zip"
        f.write_bytes(b"PK\x03\x04 not really")
        return c.mer("data=casme2", f"data.root={f}", "trainer.max_epochs=1")

    def root_empty(c: CaseRun) -> Proc:
        (c.dir / "empty").mkdir()
        return c.mer("data=casme2", f"data.root={c.dir / 'empty'}", "trainer.max_epochs=1")

    def root_missing(c: CaseRun) -> Proc:
        return c.mer("data=casme2", f"data.root={c.dir / 'nowhere'}", "trainer.max_epochs=1")

    def truncated(c: CaseRun) -> Proc:
        root = casme2_copy(c)
        frame = root / "CASME2_RAW_selected" / "sub01" / "EP05_10" / "img167.jpg"
        data = frame.read_bytes()
        _replace(frame, data[: len(data) // 2])
        return c.mer("data=casme2", f"data.root={root}", "trainer.max_epochs=1")

    return [
        Case("run_sheet_inf_raise", "sheet", "error", inf("raise"), (SHEET, f"row {ROW}"),
             "mer.run on a sheet with onset 'inf'", 120),
        Case("run_sheet_inf_skip", "sheet", "ok", inf("skip"), (),
             "mer.run on_error=skip: trains without row 3 and lists it in results.json", 240),
        Case("run_sheet_header_only", "sheet", "error", header_only, (SHEET,),
             "mer.run on a sheet with a header and no rows", 120),
        Case("run_data_root_is_file", "sheet", "error", root_is_file, ("CASME2.zip",),
             "data.root pointing at a file, not a folder", 120),
        Case("run_data_root_empty", "sheet", "error", root_empty, ("empty",),
             "data.root an empty folder", 120),
        Case("run_data_root_missing", "sheet", "error", root_missing, ("nowhere",),
             "data.root a folder that does not exist", 120),
        Case("run_truncated_apex_jpeg", "sheet", "error", truncated, ("img167.jpg",),
             "mer.run with a truncated apex JPEG", 120),
    ]


# ------------------------------------------------------------------------------ cases: flow cache


FC_READER = r"""
import json, sys
from mer.data.databases.flowcache import FlowCacheError, read_flowcache
try:
    s = read_flowcache(sys.argv[1])
except FlowCacheError as e:
    print(f"mer: {e}", file=sys.stderr)
    sys.exit(2)
print(json.dumps({"n": len(s.meta), "excluded": s.excluded,
                  "unlisted": s.provenance.get("unlisted_images")}, default=str))
"""


def flowcache_cases() -> list[Case]:
    def reader(prepare: Callable[[Path], None], check=None) -> Callable[[CaseRun], Proc]:
        def body(c: CaseRun) -> Proc:
            root = flowcache_copy(c)
            prepare(root)
            proc = c.py(["-c", FC_READER, str(root)])
            if check and proc.rc == 0:
                check(c, json.loads(proc.out.strip().splitlines()[-1]))
            return proc
        return body

    def header_only(root: Path) -> None:
        (root / "flowcache.csv").write_text("dataset,sub,filename_o,label\n")

    def drop_first_png(root: Path) -> None:
        (root / "s1_c00 .png").unlink()

    def extra_png(root: Path) -> None:
        shutil.copy(root / "s1_c00 .png", root / "s9_stray .png")

    def check_extra(c: CaseRun, out: dict) -> None:
        c.expect(out["n"] == 24, f"{out['n']} samples, 24 expected")
        c.expect(any("s9_stray" in str(e) for e in out["excluded"]),
                 f"the stray PNG is not listed in excluded: {out['excluded']}")

    def one_class(root: Path) -> None:
        lines = (root / "flowcache.csv").read_text().splitlines()
        (root / "flowcache.csv").write_text(
            "\n".join([lines[0]] + [ln.rsplit(",", 1)[0] + ",1" for ln in lines[1:]]) + "\n")

    def corrupt_png(root: Path) -> None:
        p = root / "s2_c10 .png"
        _replace(p, p.read_bytes()[:60])

    def odd_size(root: Path) -> None:
        import cv2
        import numpy as np

        (root / "s2_c10 .png").unlink()
        cv2.imwrite(str(root / "s2_c10 .png"), np.zeros((32, 32, 3), np.uint8))

    def label_7(root: Path) -> None:
        csv = root / "flowcache.csv"
        lines = csv.read_text().splitlines()
        lines[3] = lines[3].rsplit(",", 1)[0] + ",7"
        csv.write_text("\n".join(lines) + "\n")

    def binary_csv(root: Path) -> None:
        _replace(root / "flowcache.csv", bytes(range(256)) * 4)

    def missing_col(root: Path) -> None:
        csv = root / "flowcache.csv"
        lines = csv.read_text().splitlines()
        csv.write_text("\n".join(ln.rsplit(",", 1)[0] for ln in lines) + "\n")

    def empty_dir(root: Path) -> None:
        for p in root.iterdir():
            p.unlink()

    def one_subject(c: CaseRun) -> Proc:
        root = flowcache_copy(c, n_subjects=1)
        return c.mer("data=flowcache", f"data.root={root}", "trainer.max_epochs=1")

    def run_header_only(c: CaseRun) -> Proc:
        root = flowcache_copy(c)
        header_only(root)
        return c.mer("data=flowcache", f"data.root={root}", "trainer.max_epochs=1")

    def run_ok(c: CaseRun) -> Proc:
        root = flowcache_copy(c)
        extra_png(root)
        proc = c.mer("data=flowcache", f"data.root={root}", "trainer.max_epochs=1")
        if proc.rc == 0:
            c.silent += recompute_metrics(c.dir / "run")
            res = json.loads((c.dir / "run" / "results.json").read_text())
            c.expect("s9_stray" in json.dumps(res.get("data", {})),
                     "the stray PNG is not listed in results.json")
        return proc

    csv = "flowcache.csv"
    return [
        Case("fc_header_only_csv", "flowcache", "error", reader(header_only), (csv, "no rows"),
             "a header-only CSV (was IndexError)", 60),
        Case("fc_first_png_missing", "flowcache", "error", reader(drop_first_png),
             (csv, "row 2", "s1_c00"), "the PNG of the first row missing (was a misleading "
             "'neither a CSV nor LOSO folders')", 60),
        Case("fc_extra_png", "flowcache", "ok", reader(extra_png, check_extra), (),
             "a PNG without a CSV row: left out with a warning and listed", 60),
        Case("fc_one_class", "flowcache", "error", reader(one_class), (csv, "two classes"),
             "every label one class (was: UAR over absent classes)", 60),
        Case("fc_corrupt_png", "flowcache", "error", reader(corrupt_png), ("s2_c10",),
             "a PNG cut to 60 bytes", 60),
        Case("fc_odd_size_png", "flowcache", "error", reader(odd_size), ("s2_c10",),
             "one 32x32 PNG among 28x28", 60),
        Case("fc_label_7", "flowcache", "error", reader(label_7), (csv, "row 4"),
             "label 7 of 3 classes", 60),
        Case("fc_binary_csv", "flowcache", "error", reader(binary_csv), (csv,),
             "a CSV of binary garbage", 60),
        Case("fc_csv_missing_label", "flowcache", "error", reader(missing_col),
             (csv, "label"), "a CSV without its label column", 60),
        Case("fc_empty_folder", "flowcache", "error", reader(empty_dir), ("flowcache",),
             "an empty flow-cache folder", 60),
        Case("run_fc_one_subject", "flowcache", "error", one_subject, ("subject",),
             "mer.run LOSO on a cache of one subject", 120),
        Case("run_fc_header_only", "flowcache", "error", run_header_only, (csv,),
             "mer.run on a header-only flow-cache CSV", 120),
        Case("run_fc_ok_results_recomputed", "flowcache", "ok", run_ok, (),
             "mer.run on a valid cache (+1 stray PNG): UF1/UAR recomputed from predictions",
             180),
    ]


# ------------------------------------------------------------------------------ cases: mer's caches


PLANT = r"""
import sys, numpy as np
from pathlib import Path
from mer.data.preprocess.cache import HASH_NAME, content_sha256
path, how = Path(sys.argv[1]), sys.argv[2]
with np.load(path) as z:
    arrays = {k: z[k] for k in z.files if k != HASH_NAME}
name = next(k for k in sorted(arrays) if k != "landmarks" and arrays[k].dtype.kind == "f")
arrays[name] = arrays[name].copy()
arrays[name].flat[0] = np.nan
stored = content_sha256(path.stem, arrays)  # a NaN entry that verifies: the NaN guard's job
path.unlink()
with open(path, "wb") as f:
    np.savez(f, **arrays, **{HASH_NAME: np.array(stored)})
print(path, name)
"""


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.npz"))


def cache_cases() -> list[Case]:
    def flow_entry(how: str) -> Callable[[CaseRun], Proc]:
        def body(c: CaseRun) -> Proc:
            cache = private_cache(c)
            entries = _entries(cache / "flow")
            target = entries[0]
            if how == "nan":
                planted = c.py(["-c", PLANT, str(target), "nan"])
                if planted.rc:
                    raise FixtureError("plant NaN", planted)
            elif how == "swap":
                _replace(target, entries[1].read_bytes())
            else:
                _replace(target, target.read_bytes()[:200])
            c.case.names = (target.name,)
            proc = c.mer(*TINY, cache=cache)
            if proc.rc == 0:
                c.silent += recompute_metrics(c.dir / "run")
            return proc
        return body

    def prepared_entry(how: str) -> Callable[[CaseRun], Proc]:
        def body(c: CaseRun) -> Proc:
            cache = private_cache(c, flow=False)
            prep = c.mer("data.preset=tiny", "data.face.detector=none", module="mer.prepare",
                         run_dir=c.dir / "prepare", cache=cache)
            if prep.rc:
                raise FixtureError("mer.prepare", prep)
            entries = _entries(cache / "prepared" / "clips")
            target = entries[0]
            if how == "nan":
                planted = c.py(["-c", PLANT, str(target), "nan"])
                if planted.rc:
                    raise FixtureError("plant NaN", planted)
            else:
                _replace(target, entries[1].read_bytes())
            c.case.names = (target.name,)
            proc = c.mer(*TINY[:2], "data.face.detector=none", "data.prepared=true", cache=cache)
            if proc.rc == 0:
                c.silent += recompute_metrics(c.dir / "run")
            return proc
        return body

    def prepare_ok(c: CaseRun) -> Proc:
        cache = private_cache(c, flow=False)
        proc = c.mer("data.preset=tiny", "data.face.detector=none", module="mer.prepare",
                     cache=cache)
        if proc.rc == 0:
            rep = json.loads((c.dir / "run" / "prepare_report.json").read_text())
            c.expect(rep["samples"] + len(rep["excluded"]) == 24,
                     f"{rep['samples']} prepared + {len(rep['excluded'])} excluded != 24 clips")
            c.expect(len(rep["apex"]) == rep["samples"], "the report lacks the apex per clip")
        return proc

    def prepare_mediapipe(c: CaseRun) -> Proc:
        cache = private_cache(c, flow=False)
        proc = c.mer("data.preset=tiny", module="mer.prepare", cache=cache)
        if proc.rc == 0:
            rep = json.loads((c.dir / "run" / "prepare_report.json").read_text())
            c.expect(rep["samples"] + len(rep["excluded"]) == 24,
                     f"{rep['samples']} prepared + {len(rep['excluded'])} excluded != 24 clips")
        return proc

    def synme_truncated_frame(c: CaseRun) -> Proc:
        cache = private_cache(c, flow=True)
        frame = next((cache / "synme").glob("*/tinyA/CASME2_RAW_selected/sub01/EP05_10"))
        onset = frame / "img152.jpg"
        _replace(onset, onset.read_bytes()[:800])
        return c.mer(*TINY, cache=cache)

    return [
        Case("cache_flow_nan_entry", "cache", "error", flow_entry("nan"), ("NaN|non-finite",),
             "a flow-cache entry holding NaN, its content hash valid (was: NaN probabilities, "
             "a UF1 reported)", 150),
        Case("cache_flow_swapped_entry", "cache", "error", flow_entry("swap"), (),
             "a flow-cache entry replaced by another valid entry (was used without notice)", 150),
        Case("cache_flow_truncated_entry", "cache", "error", flow_entry("truncate"), (),
             "a flow-cache entry cut to 200 bytes", 150),
        Case("cache_prepared_nan_entry", "cache", "error", prepared_entry("nan"),
             ("NaN|non-finite",), "a prepared-cache entry holding NaN, hash valid", 240),
        Case("cache_prepared_swapped_entry", "cache", "error", prepared_entry("swap"), (),
             "a prepared-cache entry replaced by another valid entry", 240),
        Case("prepare_ok_report", "cache", "ok", prepare_ok, (),
             "mer.prepare (detector none): every clip prepared or excluded, apex listed", 180),
        Case("prepare_mediapipe_ok", "cache", "either", prepare_mediapipe, ("mediapipe",),
             "mer.prepare with the default detector (MediaPipe): every clip prepared or "
             "excluded; if MediaPipe cannot load, an error naming it", 180),
        Case("cache_synme_truncated_frame", "cache", "error", synme_truncated_frame,
             ("img152.jpg",), "a SynME onset frame truncated in the cache (was: trained "
             "silently on a half-grey frame)", 150),
    ]


# ------------------------------------------------------------------------------ cases: runs


def run_cases() -> list[Case]:
    def recompute(c: CaseRun) -> Proc:
        c.silent += recompute_metrics(ref_loso(c))
        return Proc([f"(the reference run {c.ctx.work / 'fixtures' / 'ref_loso'})"], rc=0)

    def sigterm(c: CaseRun) -> Proc:
        ref = ref_loso(c)
        run_dir = c.dir / "run"
        run = c.start(c.mer_args(REF_LOSO, run_dir=run_dir))
        deadline = time.monotonic() + c.timeout()
        while time.monotonic() < deadline and run.alive():
            if list((run_dir / "folds_done").glob("*.npz")):
                break
            time.sleep(0.1)
        if not run.alive():
            c.notes.append("the run ended before it could be terminated")
        run.signal(signal.SIGTERM)
        killed = c.finish(run)
        if TRACEBACK in killed.text:
            c.notes.append("SIGTERM printed a traceback")
        if killed.rc == 0:
            c.notes.append("terminated run exited 0")
        done = len(list((run_dir / "folds_done").glob("*.npz")))
        proc = c.mer(*REF_LOSO, "resume=true")
        if proc.rc == 0:
            c.silent += same_run(ref, run_dir)
            res = json.loads((run_dir / "results.json").read_text())
            resumed = res.get("protocol", {}).get("resumed_folds", [])
            c.notes.append(f"terminated with {done} of 8 folds saved (exit {killed.rc}); "
                           f"resumed {len(resumed)}; equal to the uninterrupted run")
        return proc

    def sigint(c: CaseRun) -> Proc:
        ref = ref_loso(c)
        run_dir = c.dir / "run"
        run = c.start(c.mer_args(REF_LOSO, run_dir=run_dir))
        deadline = time.monotonic() + c.timeout()
        while time.monotonic() < deadline and run.alive():
            if list((run_dir / "folds_done").glob("*.npz")):
                break
            time.sleep(0.1)
        run.signal(signal.SIGINT)
        proc = c.finish(run)
        if proc.rc == 0:  # Ctrl-C ignored, or too late: the results must still be whole
            c.silent += same_run(ref, run_dir)
            c.notes.append("exit 0 after Ctrl-C; results equal the uninterrupted run's")
        return proc

    def two_runs(c: CaseRun) -> Proc:
        synme_root(c)
        run_dir = c.dir / "run"
        first = c.start(c.mer_args((*TINY, "seed=1"), run_dir=run_dir))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and first.alive():
            if (run_dir / ".hydra" / "config.yaml").exists():
                break
            time.sleep(0.05)
        second = c.start(c.mer_args((*TINY, "seed=2"), run_dir=run_dir))
        proc = c.finish(second)
        done = c.finish(first)
        res, hyd = results_config(run_dir)
        if res is None or hyd is None:
            c.silent.append(f"the first run left no results.json/.hydra (exit {done.rc})")
        elif not (res["seed"] == hyd["seed"] == 1):
            c.corrupt.append(f"results.json seed {res['seed']}, .hydra/config.yaml seed "
                             f"{hyd['seed']}: the folder mixes the two runs")
        if done.rc:
            c.silent.append(f"the first run failed (exit {done.rc})")
        c.case.names = ("in use", str(first.popen.pid))
        return proc

    def two_fed_runs(c: CaseRun) -> Proc:
        synme_root(c)
        run_dir = c.dir / "run"
        first = c.start(c.mer_args((*FED, "model.lr=0.001"), run_dir=run_dir))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and first.alive():
            if (run_dir / ".mer.lock").exists():
                break
            time.sleep(0.05)
        second = c.start(c.mer_args((*FED, "model.lr=0.01"), run_dir=run_dir))
        proc = c.finish(second)
        done = c.finish(first)
        res, hyd = results_config(run_dir)
        if res and hyd and not (res["model"]["lr"] == hyd["model"]["lr"] == 0.001):
            c.corrupt.append(f"results.json lr {res['model']['lr']}, .hydra lr "
                             f"{hyd['model']['lr']}: mixed")
        if done.rc:
            c.silent.append(f"the first run failed (exit {done.rc})")
        c.case.names = ("in use", str(first.popen.pid))
        return proc

    def folds_done(how: str) -> Callable[[CaseRun], Proc]:
        def body(c: CaseRun) -> Proc:
            ref = ref_loso(c)
            run_dir = _copytree(ref, c.dir / "run")
            for name in ("results.json", "predictions.csv", "confusion_matrix.png"):
                (run_dir / name).unlink(missing_ok=True)
            target = run_dir / "folds_done" / "tinyA_sub02.npz"
            if how == "truncate":
                _replace(target, target.read_bytes()[:300])
            else:  # another fold's valid file under this fold's name (same number of clips)
                _replace(target, (run_dir / "folds_done" / "tinyA_sub01.npz").read_bytes())
            proc = c.mer(*REF_LOSO, "resume=true")
            if proc.rc == 0:
                c.silent += same_run(ref, run_dir)
            return proc
        return body

    def fed_state_truncated(c: CaseRun) -> Proc:
        ref = ref_fed(c)
        run_dir = _copytree(ref, c.dir / "run")
        state = next(run_dir.glob("checkpoints/*/federated_state.pt"))
        _replace(state, state.read_bytes()[: state.stat().st_size // 2])
        return c.mer(*REF_FED, "resume=true")

    def fed_resume_equal(c: CaseRun) -> Proc:
        ref = ref_fed(c)
        run_dir = c.dir / "run"
        first = c.mer(*FED)  # round 1 only, then extended to 2 with resume=true
        if first.rc:
            return first
        proc = c.mer(*REF_FED, "resume=true")
        if proc.rc == 0:
            a = json.loads((ref / "results.json").read_text())["federated"]["final"]
            b = json.loads((run_dir / "results.json").read_text())["federated"]["final"]
            c.expect(a == b, "a run extended from 1 to 2 rounds with resume=true differs from "
                     "2 rounds uninterrupted")
        return proc

    def fed_sigterm(c: CaseRun) -> Proc:
        ref = ref_fed(c)
        run_dir = c.dir / "run"
        args = (*REF_FED, "federated.workers=2")
        run = c.start(c.mer_args(args, run_dir=run_dir))
        deadline = time.monotonic() + c.timeout()
        while time.monotonic() < deadline and run.alive():
            if list(run_dir.glob("checkpoints/*/federated_state.pt")):
                break
            time.sleep(0.1)
        run.signal(signal.SIGTERM)
        killed = c.finish(run)
        proc = c.mer(*args, "resume=true")
        if proc.rc == 0:
            a = json.loads((ref / "results.json").read_text())["federated"]["final"]
            b = json.loads((run_dir / "results.json").read_text())["federated"]["final"]
            c.expect(a == b, "resumed federated run (workers=2) differs from the uninterrupted")
            c.notes.append(f"terminated (exit {killed.rc}), resumed, equal")
        return proc

    def disk_full_cache(c: CaseRun) -> Proc:
        root = synme_root(c)
        cache = c.dir / "cache"
        size = sum(-(-f.stat().st_size // 4096) * 4 for f in root.rglob("*") if f.is_file())
        try:
            c.mount(cache, tmpfs_kb=size + 120)
            fsize = None
            c.case.how = "tmpfs of SynME's size + 120 KiB as MER_CACHE_DIR"
        except Skip:
            cache.mkdir(exist_ok=True)
            fsize = 6000
            c.case.how = "ulimit -f (EFBIG): not root"
        _copytree(root, cache / "synme" / root.name)
        proc = c.mer(*TINY, cache=cache, fsize=fsize)
        c.corrupt += [f"temporary file left: {f}" for f in _leftovers(cache)]
        return proc

    def disk_full_run_dir(c: CaseRun) -> Proc:
        ref_loso(c)
        out = c.dir / "out"
        try:
            c.mount(out, tmpfs_kb=40)
            fsize = None
            c.case.how = "tmpfs of 40 KiB as hydra.run.dir"
        except Skip:
            out.mkdir(exist_ok=True)
            fsize = 20000
            c.case.how = "ulimit -f (EFBIG): not root"
        proc = c.mer(*TINY, run_dir=out / "run", fsize=fsize)
        check_results_readable(c, out / "run")
        c.corrupt += [f"temporary file left: {f}" for f in _leftovers(out)]
        return proc

    def ro_cache(complete: bool) -> Callable[[CaseRun], Proc]:
        def body(c: CaseRun) -> Proc:
            src = private_cache(c, flow=complete)
            ro = c.dir / "ro_cache"
            c.mount(ro, read_only_of=src)
            proc = c.mer(*TINY, cache=ro)
            if proc.rc == 0:
                c.silent += recompute_metrics(c.dir / "run")
            return proc
        return body

    def ro_run_dir(c: CaseRun) -> Proc:
        ref_loso(c)
        (c.dir / "src").mkdir()
        c.mount(c.dir / "ro", read_only_of=c.dir / "src")
        return c.mer(*TINY, run_dir=c.dir / "ro" / "run")

    def run_dir_under_file(c: CaseRun) -> Proc:
        synme_root(c)
        (c.dir / "afile").write_text("x")
        return c.mer(*TINY, run_dir=c.dir / "afile" / "run")

    def sweep_dir_under_file(c: CaseRun) -> Proc:
        synme_root(c)
        (c.dir / "afile").write_text("x")
        return c.py(["-m", "mer.run", "-m", *TINY, "seed=1,2", "progress=false",
                     f"hydra.sweep.dir={c.dir / 'afile' / 'sweep'}"])

    def diverge(c: CaseRun) -> Proc:
        ref_loso(c)
        proc = c.mer(*TINY, "model.lr=1e30")
        if proc.rc == 0:
            c.silent += recompute_metrics(c.dir / "run")
        return proc

    return [
        Case("run_results_recomputed", "run", "ok", recompute, (),
             "results.json UF1/UAR/accuracy (overall, per database) recomputed from "
             "predictions.csv", 240),
        Case("run_sigterm_loso_resume", "run", "ok", sigterm, (),
             "SIGTERM to a LOSO run's process group (workers=2), then resume=true: no process "
             "left after 5 s, resumed = uninterrupted", 240),
        Case("run_sigint_loso", "run", "either", sigint, ("resume=true|interrupted|Interrupted",),
             "Ctrl-C (SIGINT to the group) on a LOSO run with workers=2: no orphans", 240),
        Case("run_two_runs_one_dir", "run", "error", two_runs, (),
             "two LOSO seeds started on one hydra.run.dir at once", 240),
        Case("run_two_fed_runs_one_dir", "run", "error", two_fed_runs, (),
             "two federated learning rates on one hydra.run.dir at once", 240),
        Case("run_folds_done_truncated", "run", "either", folds_done("truncate"),
             ("tinyA_sub02.npz",), "folds_done/tinyA_sub02.npz truncated, then resume=true "
             "(was a raw zip error)", 240),
        Case("run_folds_done_swapped", "run", "either", folds_done("swap"),
             ("tinyA_sub02.npz",), "folds_done/tinyA_sub02.npz replaced by sub01's valid "
             "file, then resume=true", 240),
        Case("run_fed_state_truncated", "run", "error", fed_state_truncated,
             ("federated_state.pt",), "checkpoints/.../federated_state.pt truncated, then "
             "resume=true (was a raw torch error)", 240),
        Case("run_fed_resume_extends", "run", "ok", fed_resume_equal, (),
             "1 round, then resume=true with rounds=2: equal to 2 rounds uninterrupted", 300),
        Case("run_fed_sigterm_resume", "run", "ok", fed_sigterm, (),
             "SIGTERM to a federated run (federated.workers=2), then resume=true", 300),
        Case("run_disk_full_cache", "run", "error", disk_full_cache,
             ("disk is full|No space left|File too large", "cache"),
             "disk full while writing the flow cache (was 'basic_ios::clear', no path)", 240),
        Case("run_disk_full_run_dir", "run", "error", disk_full_run_dir,
             ("disk is full|No space left|File too large", "out/run"),
             "disk full in the run folder", 240),
        Case("run_ro_cache_needs_flow", "run", "error", ro_cache(False),
             ("ro_cache", "not writable|read-only|Read-only"),
             "a read-only cache that needs new flow (was: fails after computing)", 240,
             "read-only bind mount"),
        Case("run_ro_cache_complete", "run", "ok", ro_cache(True), (),
             "a read-only cache that holds every entry already (nothing to write)", 240,
             "read-only bind mount"),
        Case("run_ro_run_dir", "run", "error", ro_run_dir, ("ro/run",),
             "hydra.run.dir on a read-only mount", 120, "read-only bind mount"),
        Case("run_run_dir_under_file", "run", "error", run_dir_under_file, ("afile",),
             "hydra.run.dir below a regular file", 120),
        Case("run_sweep_dir_under_file", "run", "error", sweep_dir_under_file,
             ("afile/sweep",), "a multirun whose hydra.sweep.dir is below a regular file (was "
             "a traceback from Hydra's sweeper)", 120),
        Case("run_diverging_lr", "run", "either", diverge, ("NaN|non-finite",),
             "model.lr=1e30: NaN outputs must be an error naming the sample, never scored",
             180),
        *[fed_start_case(rule) for rule in ("fedadam", "fedyogi", "fedadagrad")],
    ]


# ------------------------------------------------------------------------------ cases: collect


def _fold_jobs(c: CaseRun, folds: list[int], dup: int | None = None) -> Path:
    """A sweep folder of LOSO fold jobs cut from the reference run."""
    import pandas as pd

    ref = ref_loso(c)
    res = json.loads((ref / "results.json").read_text())
    pred = pd.read_csv(ref / "predictions.csv", dtype={"subject": str})
    names = sorted(pred["fold"].unique())
    sweep = c.dir / "sweep"
    for job, i in enumerate([*folds, *([dup] if dup is not None else [])]):
        d = sweep / f"{job}_protocol.fold_index={i}"
        (d / ".hydra").mkdir(parents=True)
        r = json.loads(json.dumps(res))
        r["config"]["protocol"]["fold_index"] = i
        r["protocol"]["partial"] = True
        (d / "results.json").write_text(json.dumps(r))
        pred[pred["fold"] == names[i]].to_csv(d / "predictions.csv", index=False)
        (d / ".hydra" / "overrides.yaml").write_text(f"- protocol.fold_index={i}\n")
    return sweep


def collect_cases() -> list[Case]:
    def complete(c: CaseRun) -> Proc:
        sweep = _fold_jobs(c, list(range(8)))
        proc = c.py(["-m", "mer.collect", str(sweep)])
        if proc.rc == 0:
            import pandas as pd

            s = pd.read_csv(sweep / "summary.csv")
            ref = json.loads((ref_loso(c) / "results.json").read_text())["metrics"]["overall"]
            c.expect(len(s) == 1 and bool(s["complete"].iloc[0]), f"summary: {s.to_dict()}")
            c.expect(abs(s["uf1"].iloc[0] - ref["uf1"]) < 1e-4,
                     f"pooled UF1 {s['uf1'].iloc[0]} != the whole run's {ref['uf1']}")
        return proc

    def partial(c: CaseRun) -> Proc:
        sweep = _fold_jobs(c, [0, 1, 2])
        proc = c.py(["-m", "mer.collect", str(sweep)])
        if proc.rc == 0:
            import pandas as pd

            s = pd.read_csv(sweep / "summary.csv")
            c.expect(not bool(s["complete"].iloc[0]) and int(s["folds"].iloc[0]) == 3,
                     f"3 of 8 folds not reported incomplete: {s.to_dict('records')}")
        return proc

    def duplicate(c: CaseRun) -> Proc:
        return c.py(["-m", "mer.collect", str(_fold_jobs(c, [0, 1], dup=1))])

    def unfinished(c: CaseRun) -> Proc:
        sweep = _fold_jobs(c, [0, 1])
        job = sweep / "2_protocol.fold_index=2"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text("- protocol.fold_index=2\n")
        (job / "run.log").write_text("started\n")
        proc = c.py(["-m", "mer.collect", str(sweep)])
        if proc.rc == 0:
            c.expect("2_protocol.fold_index=2" in proc.text,
                     "the job folder without results.json (unfinished) is not mentioned")
        return proc

    def truncated_results(c: CaseRun) -> Proc:
        sweep = _fold_jobs(c, [0, 1])
        p = sweep / "1_protocol.fold_index=1" / "results.json"
        _replace(p, p.read_bytes()[:100])
        proc = c.py(["-m", "mer.collect", str(sweep)])
        if proc.rc == 0:
            c.expect("1_protocol.fold_index=1" in proc.text,
                     "the truncated results.json is not mentioned")
        return proc

    def no_predictions(c: CaseRun) -> Proc:
        sweep = _fold_jobs(c, [0, 1])
        (sweep / "1_protocol.fold_index=1" / "predictions.csv").unlink()
        return c.py(["-m", "mer.collect", str(sweep)])

    def empty(c: CaseRun) -> Proc:
        (c.dir / "sweep").mkdir()
        return c.py(["-m", "mer.collect", str(c.dir / "sweep")])

    def out_is_file(c: CaseRun) -> Proc:
        sweep = _fold_jobs(c, [0])
        (c.dir / "afile").write_text("x")
        return c.py(["-m", "mer.collect", str(sweep), "--out", str(c.dir / "afile")])

    return [
        Case("collect_fold_jobs_complete", "collect", "ok", complete, (),
             "8 fold jobs pooled: complete, UF1 equal to the whole run's", 90),
        Case("collect_fold_jobs_partial", "collect", "ok", partial, (),
             "3 of 8 fold jobs: reported incomplete", 90),
        Case("collect_duplicate_fold", "collect", "error", duplicate, ("fold",),
             "one fold in two job folders", 90),
        Case("collect_unfinished_job", "collect", "either", unfinished,
             ("2_protocol.fold_index=2",), "a half-finished sweep: one job folder without "
             "results.json (must be mentioned, not dropped)", 90),
        Case("collect_truncated_results", "collect", "either", truncated_results,
             ("1_protocol.fold_index=1",), "one job's results.json cut to 100 bytes", 90),
        Case("collect_missing_predictions", "collect", "error", no_predictions,
             ("1_protocol.fold_index=1", "predictions.csv"), "a job without predictions.csv",
             90),
        Case("collect_empty_folder", "collect", "error", empty, ("sweep",),
             "mer.collect on an empty folder", 90),
        Case("collect_out_is_file", "collect", "error", out_is_file, ("afile",),
             "mer.collect --out pointing at a file", 90),
    ]


# ------------------------------------------------------------------------------ cases: CKKS keys


def keys_cases() -> list[Case]:
    def ok(c: CaseRun) -> Proc:
        proc = c.py(["-m", "mer.privacy.keys", "--out", str(c.dir / "keys")])
        if proc.rc == 0:
            code = ("import sys, tenseal as ts; from pathlib import Path; d = Path(sys.argv[1]); "
                    "s = ts.context_from((d / 'ckks-secret.ctx').read_bytes()); "
                    "p = ts.context_from((d / 'ckks-public.ctx').read_bytes()); "
                    "print(s.is_private(), p.is_private())")
            chk = c.py(["-c", code, str(c.dir / "keys")])
            c.expect(chk.rc == 0 and chk.out.split() == ["True", "False"],
                     f"key files: secret private / public not? {chk.out.strip()} {chk.err[-200:]}")
        return proc

    def out_is_file(c: CaseRun) -> Proc:
        (c.dir / "afile").write_text("x")
        return c.py(["-m", "mer.privacy.keys", "--out", str(c.dir / "afile")])

    def bad_degree(c: CaseRun) -> Proc:
        return c.py(["-m", "mer.privacy.keys", "--out", str(c.dir / "keys"),
                     "--poly-modulus-degree", "1000"])

    def existing_keys(c: CaseRun) -> Proc:
        d = keys(c)
        before = (d / "ckks-secret.ctx").read_bytes()
        proc = c.py(["-m", "mer.privacy.keys", "--out", str(d)])
        c.expect((d / "ckks-secret.ctx").read_bytes() == before,
                 "the federation's secret key file was replaced without --force")
        return proc

    def keys(c: CaseRun) -> Path:
        proc = c.py(["-m", "mer.privacy.keys", "--out", str(c.dir / "keys")])
        if proc.rc:
            raise FixtureError("mer.privacy.keys", proc)
        return c.dir / "keys"

    def fed_ckks(secret: str) -> Callable[[CaseRun], Proc]:
        def body(c: CaseRun) -> Proc:
            synme_root(c)
            d = keys(c)
            s = d / "ckks-secret.ctx"
            if secret == "truncated":
                _replace(s, s.read_bytes()[:1000])
            elif secret == "public":
                s = d / "ckks-public.ctx"
            elif secret == "missing":
                s = d / "nowhere.ctx"
            c.case.names = (s.name,)
            return c.mer(*FED, "privacy=ckks", "privacy.min_clients=2",
                         f"privacy.secret_context={s}",
                         f"privacy.public_context={d / 'ckks-public.ctx'}")
        return body

    return [
        Case("keys_ok", "keys", "ok", ok, (), "python -m mer.privacy.keys: a private and a "
             "public context", 90),
        Case("keys_out_is_file", "keys", "error", out_is_file, ("afile",),
             "--out pointing at a file", 90),
        Case("keys_bad_degree", "keys", "error", bad_degree, ("1000|poly",),
             "--poly-modulus-degree 1000 (not a power of two >= 1024)", 90),
        Case("keys_existing_keys", "keys", "error", existing_keys, ("ckks-secret.ctx",
                                                                    "--force"),
             "--out already holding a key pair (was: replaced, locking out every lab)", 90),
        Case("run_ckks_secret_truncated", "keys", "error", fed_ckks("truncated"), (),
             "privacy=ckks with a truncated secret key file", 180),
        Case("run_ckks_secret_is_public", "keys", "error", fed_ckks("public"), (),
             "privacy.secret_context given the public key file (no secret key)", 180),
        Case("run_ckks_secret_missing", "keys", "error", fed_ckks("missing"), (),
             "privacy.secret_context naming a file that does not exist", 180),
    ]


# ------------------------------------------------------------------------------ all cases


def all_cases() -> list[Case]:
    sheets = [sheet_case(k, col, v, what, mode) for k, col, v, what in SHEET_DEFECTS
              for mode in ("raise", "skip")]
    cases = [*config_cases(), *sheets, *sheet_misc_cases(), *run_sheet_cases(),
             *flowcache_cases(), *cache_cases(), *run_cases(), *collect_cases(), *keys_cases()]
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases


# ------------------------------------------------------------------------------ report


def write_report(results: list[Result], out: Path, seconds: float) -> None:
    counts = {o: sum(r.outcome == o for r in results) for o in OUTCOMES}
    tried = len(results) - counts["skipped"]
    (out / "reliability.json").write_text(json.dumps(
        {"tried": tried, "counts": counts, "seconds": round(seconds, 1),
         "cases": [vars(r) for r in results]}, indent=1))
    cols = ["tried", *OUTCOMES]
    lines = ["# Reliability rerun (issue 12)", "",
             f"{len(results)} cases in {seconds / 60:.1f} min "
             f"({sum(r.cpu for r in results) / 60:.1f} CPU min) "
             f"(`python scripts/reliability_cases.py`). Every column but 'OK' and "
             "'clear error' should be 0.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
             "| " + " | ".join(str(v) for v in [tried, *counts.values()]) + " |", ""]
    groups = sorted({r.group for r in results})
    lines += ["## By group", "", "| group | " + " | ".join(cols) + " |",
              "|" + "---|" * (len(cols) + 1)]
    for g in groups:
        rs = [r for r in results if r.group == g]
        row = [sum(r.outcome != "skipped" for r in rs)] + [sum(r.outcome == o for r in rs)
                                                           for o in OUTCOMES]
        lines.append(f"| {g} | " + " | ".join(map(str, row)) + " |")
    lines += ["", "## Cases", "", "s: wall seconds; CPU: CPU seconds of mer's processes.", "",
              "| case | what | expected | outcome | s | CPU | detail |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        detail = (r.detail + (f" [{r.how}]" if r.how else "")).replace("|", "\\|")
        detail = detail.replace("\n", " ")[:300]
        lines.append(f"| {r.name} | {r.what.replace('|', '/')} | {r.expect} | **{r.outcome}** "
                     f"| {r.seconds:.0f} | {r.cpu:.0f} | {detail} |")
    bad = [r for r in results if r.outcome not in ("OK", "clear error")]
    lines += ["", f"## Not OK / clear error ({len(bad)})", ""]
    for r in bad:
        lines += [f"### {r.name}: {r.outcome}", "", f"{r.what}. {r.detail}", "",
                  "```", *r.commands, "```", "", "stderr tail:", "", "```", r.tail, "```", ""]
    (out / "reliability.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="run only cases whose name matches (glob or substring; repeatable)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="seconds per mer process of a case (default: each case's own, 60-300)")
    p.add_argument("--out", type=Path, default=Path("reliability"), metavar="DIR",
                   help="where reliability.md/.json and logs/ go (default ./reliability)")
    p.add_argument("--cache", type=Path, default=None, metavar="DIR",
                   help="shared MER_CACHE_DIR for the cases (default: a fresh temp folder)")
    p.add_argument("--work", type=Path, default=None, metavar="DIR",
                   help="where the cases' folders go (default: a temp folder, removed after)")
    p.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    args = p.parse_args(argv)

    cases = all_cases()
    if args.only:
        cases = [c for c in cases if any(fnmatch.fnmatch(c.name, pat) or pat in c.name
                                         for pat in args.only)]
    if args.list:
        for c in cases:
            print(f"{c.name:40s} {c.group:10s} {c.expect:7s} {c.what}")
        return 0
    if not cases:
        p.error(f"no case matches {args.only}")
    work = args.work or Path(tempfile.mkdtemp(prefix="mer-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    ctx = Ctx(work.resolve(), (args.cache or work / "cache").resolve(), args.timeout,
              logs.resolve())
    ctx.cache.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    results: list[Result] = []

    def one(case: Case) -> Result:
        r = run_case(ctx, case)
        print(f"{r.outcome:16s} {r.seconds:6.1f}s {r.cpu:5.1f}cpu  {r.name}: {r.detail[:150]}",
              flush=True)
        return r

    try:
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = list(pool.map(one, cases))
    finally:
        seconds = time.monotonic() - t0
        write_report(results, args.out, seconds)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    counts = {o: sum(r.outcome == o for r in results) for o in OUTCOMES}
    print(f"\n{len(results)} cases in {seconds:.0f} s: "
          + ", ".join(f"{o} {n}" for o, n in counts.items() if n)
          + f"\nreport: {args.out / 'reliability.md'}")
    return 0 if all(r.outcome in ("OK", "clear error", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
