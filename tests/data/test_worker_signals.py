"""Ctrl-C while the data layer's worker pools run (SynME generation, flow): one line from the
main process with the way to continue, exit 130, no worker tracebacks, no worker left over."""

import os
import signal
import subprocess
import sys
import time

import pytest

from mer.data.workers import image_pool, image_pool_args, prepare_worker


def _sigint_handler() -> str:
    return str(signal.getsignal(signal.SIGINT))


def test_image_workers_leave_ctrl_c_to_the_main_process():

    with image_pool(1) as pool:
        assert pool.apply(_sigint_handler) == str(signal.SIG_IGN)
    assert image_pool_args()["initargs"] == (os.getpid(),)
    assert callable(prepare_worker)


def _children(pid: int) -> list[str]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return out.split()


@pytest.mark.slow
def test_ctrl_c_during_prepare_workers_is_one_line_and_leaves_nothing(tmp_path):
    env = {**os.environ, "MER_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mer.prepare", "data=synme", "data.preset=tiny", "data.workers=2",
         f"hydra.run.dir={tmp_path / 'run'}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=env)
    deadline = time.monotonic() + 120
    while len(_children(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # until the pool's workers run (a fresh cache: SynME is generated)
    assert proc.poll() is None, "prepare ended before its pool started"
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert "mer: interrupted" in err
    assert _alive_in_group(proc.pid, wait_s=10) == []


def _alive_in_group(pgid: int, wait_s: float) -> list[str]:
    """Processes of group ``pgid`` still running (zombies waiting for init do not count)."""
    deadline = time.monotonic() + wait_s
    while True:
        out = subprocess.run(["ps", "-o", "stat=,cmd=", "-g", str(pgid)], capture_output=True,
                             text=True).stdout
        alive = [line for line in out.splitlines() if line.strip() and not line.startswith("Z")]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


_BLOCKED_WORKER = """
import signal, sys, threading, time
from mer.data.workers import prepare_worker

prepare_worker()
threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
# the main thread waits on a lock nobody releases (a pool worker on the queue lock that
# Pool.terminate holds), with SIGTERM masked there: the kernel must deliver it to the other
# thread, as it may whenever a worker has OpenCV's or torch's threads
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
lock = threading.Lock()
lock.acquire()
print("waiting", flush=True)
lock.acquire()
"""


def test_sigterm_ends_a_worker_whose_main_thread_waits_whichever_thread_gets_it():
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKED_WORKER], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "waiting"
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM did not end the worker: a Python-level handler waits for the "
                        "main thread, which never runs")
        assert code == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
