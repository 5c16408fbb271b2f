"""Checkpoint and resume of a federated run: the whole state after every round, written
atomically with a checksum, keyed by a hash of the recipe (config and partition).

:class:`Checkpointing` is a part of :class:`mer.federated.loop.FederatedRun`.
"""

from __future__ import annotations

import hashlib
import json
import logging

from omegaconf import OmegaConf

from mer.federated.state import ClientState

log = logging.getLogger(__name__)


class Checkpointing:
    """State dict, save and resume of a federated run (a part of ``FederatedRun``)."""

    def recipe_key(self) -> str:
        """Hash of everything that shapes the run (not resume/progress/logging/paths);
        computed once, as neither config nor partition changes during a run."""
        if self._recipe is None:
            self._recipe = self._hash_recipe()
        return self._recipe

    def _hash_recipe(self) -> str:
        cfg = OmegaConf.to_container(self.cfg, resolve=True)
        for key in ("resume", "progress", "logger", "paths", "hydra"):
            cfg.pop(key, None)
        cfg.get("federated", {}).pop("rounds", None)  # a run may be extended
        cfg.get("federated", {}).pop("workers", None)  # how, not what
        split = [(c.name, c.train_idx.tolist(), c.test_idx.tolist()) for c in self.clients]
        blob = json.dumps([cfg, split], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def state_dict(self) -> dict:
        return {"round": self.round_done, "recipe": self.recipe_key(),
                "global": self.global_weights, "server_opt": self.server_opt.state_dict(),
                "rule": self.strategy.state_dict(),
                "clients": {n: vars(s) for n, s in self.state.items()},
                "curves": self.curves, "stats": self.stats, "excluded": self.excluded,
                "failures": self.failures,
                "privacy": {"clients": {n: p.accountant.history
                                        for n, p in self.client_privacy.items()},
                            "central": (self.central_dp.accountant.history,
                                        self.central_dp.rng.bit_generator.state)
                            if self.central_dp else None}}

    def load_state_dict(self, state: dict) -> None:
        self.round_done = int(state["round"])
        self.global_weights = state["global"]
        self.server_opt.load_state_dict(state["server_opt"])
        self.strategy.load_state_dict(state.get("rule") or
                                      {"server_control": state.get("server_control")})
        self.state = {n: ClientState(**s) for n, s in state["clients"].items()}
        self.curves, self.stats = state["curves"], state["stats"]
        self.excluded, self.failures = state["excluded"], state["failures"]
        for name, history in state["privacy"]["clients"].items():
            self.client_privacy[name].accountant.history = history
        if self.central_dp:
            history, rng_state = state["privacy"]["central"]
            self.central_dp.accountant.history = history
            self.central_dp.rng.bit_generator.state = rng_state

    def save(self) -> None:
        """Write the state after a round, atomically and with a checksum (an interruption
        leaves the last one; a full disk is a WriteError naming the file)."""
        if self.checkpoint is None:
            return
        from mer.data.io import atomic_save

        atomic_save(self.state_dict(), self.checkpoint, kind="torch")

    def try_resume(self) -> bool:
        """Load the checkpoint of an interrupted run of the same recipe, if there is one.

        Raises CorruptFileError (naming the file and what to delete) if it cannot be read."""
        if self.checkpoint is None or not self.checkpoint.exists():
            return False
        from mer.data.io import CorruptFileError, checked_load

        fix = ("delete it to start the federated run from round 0, or restore it from a "
               "backup")
        state = checked_load(self.checkpoint, kind="torch", what="federated checkpoint",
                             fix=fix)
        if not isinstance(state, dict) or "recipe" not in state:
            raise CorruptFileError(f"federated checkpoint {self.checkpoint} is not a mer "
                                   f"federated state; {fix}")
        if state["recipe"] != self.recipe_key():
            log.warning("not resuming from %s: it was written by a different recipe "
                        "(config or partition changed)", self.checkpoint)
            return False
        self.load_state_dict(state)
        log.info("resuming after round %d from %s", self.round_done, self.checkpoint)
        return True
