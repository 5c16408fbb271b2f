"""A federated run's clients trained in parallel: ``federated.workers`` forked processes.

:class:`WorkerPool` is a part of :class:`mer.federated.loop.FederatedRun`. Each job carries
what the client starts from; what the client changes (its state, its DP accountant) comes
back with its update, so results equal training the clients in turn.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from mer.federated.state import ClientState, ClientUpdate

_WORKER_RUN: Any = None  # a forked worker's copy of the run (a FederatedRun)


def _train_in_worker(job: dict) -> tuple[ClientUpdate | Exception, ClientState, list | None]:
    """In a worker process: one client's local training from the state in ``job``."""
    run = _WORKER_RUN
    torch.set_num_threads(job["threads"])
    k = job["k"]
    name = run.clients[k].name
    run.global_weights = job["global"]
    run.strategy.load_state_dict(job["rule"])
    run.state[name] = job["state"]
    if job["history"] is not None:
        run.client_privacy[name].accountant.history = job["history"]
    update = run._train_one(job["rnd"], k, run.fedprox_anchor())
    privacy = run.client_privacy.get(name)
    return update, run.state[name], privacy.accountant.history if privacy else None


class WorkerPool:
    """Worker processes of a federated run (a part of ``FederatedRun``)."""

    _pool = None

    def _train_parallel(self, rnd: int, training: list[int]) -> dict[int, ClientUpdate | Exception]:
        """The clients' local training in ``federated.workers`` forked processes. Each job
        carries what the client starts from (global model, its state, the rule's server
        state, its DP accountant); what it changes comes back with its update."""
        global _WORKER_RUN
        from mer.engine.workers import prepare_worker, stop_pool, terminate_on_signal

        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            _WORKER_RUN = self  # inherited by the forked workers
            # workers die with this process and end at once on SIGTERM (mer.engine.workers)
            self._pool = ProcessPoolExecutor(self.workers,
                                             mp_context=multiprocessing.get_context("fork"),
                                             initializer=prepare_worker,
                                             initargs=(os.getpid(),))
        threads = max(1, torch.get_num_threads() // self.workers)
        futures = {}
        results = {}
        try:
            with terminate_on_signal():
                for k in training:
                    name = self.clients[k].name
                    privacy = self.client_privacy.get(name)
                    futures[k] = self._pool.submit(_train_in_worker, {
                        "rnd": rnd, "k": k, "threads": threads, "global": self.global_weights,
                        "rule": self.strategy.state_dict(), "state": self.state[name],
                        "history": privacy.accountant.history if privacy else None})
                results = {k: future.result() for k, future in futures.items()}
        except BaseException:  # SIGTERM, Ctrl-C, a broken pool: never wait for the others
            stop_pool(self._pool)
            self._pool = None
            raise
        out: dict[int, ClientUpdate | Exception] = {}
        for k, (update, state, history) in results.items():
            out[k] = update
            name = self.clients[k].name
            self.state[name] = state
            if history is not None:
                self.client_privacy[name].accountant.history = history
        return out

    def close(self) -> None:
        """Stop the worker processes (``federated.workers`` > 1), if any: at once when an
        exception (SIGTERM's included) is on its way, else after their (finished) jobs."""
        if self._pool is not None:
            import sys

            from mer.engine.workers import stop_pool

            if sys.exc_info()[0] is not None:
                stop_pool(self._pool)
            else:
                self._pool.shutdown()
            self._pool = None
