"""Server optimisers: turn a round's aggregate into the next global model.

Each treats ``delta = aggregate - current`` (the negated pseudo-gradient) as an update
direction, as in Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), and follows the
arithmetic of Flower's strategies (``flwr/server/strategy/fedavgm.py``, ``fedadam.py``,
``fedyogi.py``, ``fedadagrad.py``, flwr 1.41):

========== ==================================================================================
optimiser   update (per coordinate; ``t`` = 1, 2, ... counts calls to ``step``)
========== ==================================================================================
ServerSGD   ``g = -delta``; ``m = g`` (t = 1) else ``m = momentum*m + g``;
            ``x <- x - lr*m`` (``x <- aggregate`` exactly when lr = 1 and momentum = 0)
FedAdam     ``m = b1*m + (1-b1)*delta``; ``v = b2*v + (1-b2)*delta^2``;
            ``x <- x + eta_t * m / (sqrt(v) + tau)``,
            ``eta_t = eta * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))`` (Flower's bias correction)
FedYogi     ``m`` as Adam; ``v = v - (1-b2) * delta^2 * sign(v - delta^2)``;
            ``x <- x + eta * m / (sqrt(v) + tau)``
FedAdagrad  ``m = b1*m + (1-b1)*delta`` (b1 = 0 in Flower: ``m = delta``); ``v = v + delta^2``;
            ``x <- x + eta * m / (sqrt(v) + tau)``
========== ==================================================================================

``m`` and ``v`` start at zero (as in Flower; the paper's ``v_{-1} >= tau^2`` is not used).
Flower's ``eta_l`` (client learning rate) plays no part in the server arithmetic; it belongs to
the client config. Arithmetic runs in float64 and results are cast to the current model's
dtypes; integer entries (BatchNorm's ``num_batches_tracked``) are not optimised: they take
the aggregate's value (Flower would run the same arithmetic on them).

Every optimiser has ``state_dict()`` / ``load_state_dict()`` with numpy arrays only
(``"step"`` and ``"<buffer>.<layer index>"``), for round-level checkpoints.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import numpy as np

Weights = list[np.ndarray]


class ServerOptimizer:
    """Base class: ``step(current, aggregate) -> new global weights``; state kept inside.

    Subclasses implement :meth:`_update` on float64 arrays and list the names of their
    per-layer buffers in ``buffers`` (each an attribute holding ``list[np.ndarray] | None``).
    """

    buffers: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.t = 0
        for name in self.buffers:
            setattr(self, name, None)

    def step(self, current: Weights, aggregate: Weights) -> Weights:
        """New global weights from the current global and the round's aggregate.

        Args:
            current: L arrays, the global model the round started from.
            aggregate: L arrays of the same shapes (e.g. ``fedavg(results)``).

        Returns:
            L arrays with the dtypes of ``current``.
        """
        if len(current) != len(aggregate):
            raise ValueError(
                f"{type(self).__name__}.step: current has {len(current)} arrays, "
                f"aggregate {len(aggregate)}"
            )
        for i, (c, a) in enumerate(zip(current, aggregate)):
            if np.shape(c) != np.shape(a):
                raise ValueError(
                    f"{type(self).__name__}.step: array #{i} has shape {np.shape(c)} in current, "
                    f"{np.shape(a)} in aggregate"
                )
        x = [np.asarray(c, dtype=np.float64) for c in current]
        a64 = [np.asarray(a, dtype=np.float64) for a in aggregate]
        delta = [ai - xi for ai, xi in zip(a64, x)]
        self.t += 1
        new = self._update(x, delta, a64)
        out = []
        for n, c, a in zip(new, current, aggregate):
            dtype = np.asarray(c).dtype
            if np.issubdtype(dtype, np.floating):
                out.append(np.asarray(n, dtype=dtype))
            else:
                out.append(np.array(a, dtype=dtype, copy=True))
        return out

    def _update(self, x: Weights, delta: Weights, aggregate: Weights) -> Weights:
        raise NotImplementedError

    def _zeros_if_none(self, name: str, like: Weights) -> Weights:
        value = getattr(self, name)
        if value is None:
            value = [np.zeros_like(d) for d in like]
        return value

    def state_dict(self) -> dict[str, np.ndarray]:
        """``{"step": int64 scalar array, "<buffer>.<i>": float64 array, ...}``."""
        state = {"step": np.asarray(self.t, dtype=np.int64)}
        for name in self.buffers:
            value = getattr(self, name)
            if value is not None:
                for i, arr in enumerate(value):
                    state[f"{name}.{i}"] = np.array(arr, copy=True)
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned (e.g. after ``np.load`` of an npz)."""
        if "step" not in state:
            raise KeyError(f"{type(self).__name__}.load_state_dict: no 'step' in state")
        known = {"step"}
        for name in self.buffers:
            keys = [k for k in state if k.rpartition(".")[0] == name]
            known.update(keys)
            if not keys:
                setattr(self, name, None)
                continue
            indices = sorted(int(k.rpartition(".")[2]) for k in keys)
            if indices != list(range(len(indices))):
                raise KeyError(f"{type(self).__name__}: buffer {name!r} has gaps: {indices}")
            setattr(self, name, [np.array(state[f"{name}.{i}"], dtype=np.float64) for i in indices])
        unknown = set(state) - known
        if unknown:
            raise KeyError(f"{type(self).__name__}.load_state_dict: unknown keys {sorted(unknown)}")
        self.t = int(state["step"])


class ServerSGD(ServerOptimizer):
    """Server SGD on the pseudo-gradient ``g = current - aggregate``: FedAvg, FedAvgM.

    ``m = g`` on the first step, then ``m = momentum * m + g``; ``x <- x - lr * m``
    (PyTorch's SGD convention, as Flower's FedAvgM). ``lr=1, momentum=0`` returns the
    aggregate itself (plain FedAvg).

    Args:
        lr: server learning rate (Flower's ``server_learning_rate``), default 1.
        momentum: server momentum (Flower's ``server_momentum``), default 0.
    """

    buffers = ("momentum_buffer",)

    def __init__(self, lr: float = 1.0, momentum: float = 0.0) -> None:
        if lr <= 0 or momentum < 0:
            raise ValueError(f"ServerSGD: need lr > 0 and momentum >= 0 ({lr}, {momentum})")
        self.lr = lr
        self.momentum = momentum
        super().__init__()

    def _update(self, x: Weights, delta: Weights, aggregate: Weights) -> Weights:
        if self.lr == 1.0 and self.momentum == 0.0:
            return aggregate
        g = [-d for d in delta]
        if self.momentum > 0.0:
            if self.momentum_buffer is None:
                self.momentum_buffer = g
            else:
                self.momentum_buffer = [
                    self.momentum * m + gi for m, gi in zip(self.momentum_buffer, g)
                ]
            g = self.momentum_buffer
        return [xi - self.lr * gi for xi, gi in zip(x, g)]


class FedAdam(ServerOptimizer):
    """FedAdam (Reddi et al., 2021), as Flower's ``FedAdam`` (defaults too).

    ``m = b1*m + (1-b1)*delta``, ``v = b2*v + (1-b2)*delta^2``,
    ``x <- x + eta_t * m / (sqrt(v) + tau)``.

    ``bias_correction`` sets ``eta_t``:
    ``"flower"`` (default): ``eta * sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))`` with t the 1-based
    round, exactly Flower's (its exponent is ``server_round + 1``); ``"adam"``: the same with
    exponent t (Kingma & Ba); ``"none"``: ``eta`` (Reddi et al.'s Algorithm 2).
    """

    buffers = ("m", "v")

    def __init__(
        self,
        eta: float = 1e-1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-9,
        bias_correction: Literal["flower", "adam", "none"] = "flower",
    ) -> None:
        if bias_correction not in ("flower", "adam", "none"):
            raise ValueError(f"FedAdam: unknown bias_correction {bias_correction!r}")
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau
        self.bias_correction = bias_correction
        super().__init__()

    def _eta_t(self) -> float:
        if self.bias_correction == "none":
            return self.eta
        power = self.t + 1.0 if self.bias_correction == "flower" else float(self.t)
        return self.eta * np.sqrt(1 - self.beta_2**power) / (1 - self.beta_1**power)

    def _update(self, x: Weights, delta: Weights, aggregate: Weights) -> Weights:
        b1, b2 = self.beta_1, self.beta_2
        m = self._zeros_if_none("m", delta)
        v = self._zeros_if_none("v", delta)
        self.m = [b1 * mi + (1 - b1) * d for mi, d in zip(m, delta)]
        self.v = [b2 * vi + (1 - b2) * d * d for vi, d in zip(v, delta)]
        eta_t = self._eta_t()
        return [xi + eta_t * mi / (np.sqrt(vi) + self.tau) for xi, mi, vi in zip(x, self.m, self.v)]


class FedYogi(ServerOptimizer):
    """FedYogi (Reddi et al., 2021), as Flower's ``FedYogi`` (defaults too).

    ``m = b1*m + (1-b1)*delta``, ``v = v - (1-b2) * delta^2 * sign(v - delta^2)``,
    ``x <- x + eta * m / (sqrt(v) + tau)`` (no bias correction).
    """

    buffers = ("m", "v")

    def __init__(
        self, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3
    ) -> None:
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau
        super().__init__()

    def _update(self, x: Weights, delta: Weights, aggregate: Weights) -> Weights:
        b1, b2 = self.beta_1, self.beta_2
        m = self._zeros_if_none("m", delta)
        v = self._zeros_if_none("v", delta)
        self.m = [b1 * mi + (1 - b1) * d for mi, d in zip(m, delta)]
        self.v = [vi - (1 - b2) * d * d * np.sign(vi - d * d) for vi, d in zip(v, delta)]
        return [
            xi + self.eta * mi / (np.sqrt(vi) + self.tau) for xi, mi, vi in zip(x, self.m, self.v)
        ]


class FedAdagrad(ServerOptimizer):
    """FedAdagrad (Reddi et al., 2021), as Flower's ``FedAdagrad`` (defaults too).

    ``m = b1*m + (1-b1)*delta`` (Flower fixes b1 = 0, so ``m = delta``), ``v = v + delta^2``,
    ``x <- x + eta * m / (sqrt(v) + tau)``.
    """

    buffers = ("m", "v")

    def __init__(self, eta: float = 1e-1, tau: float = 1e-9, beta_1: float = 0.0) -> None:
        self.eta, self.tau, self.beta_1 = eta, tau, beta_1
        super().__init__()

    def _update(self, x: Weights, delta: Weights, aggregate: Weights) -> Weights:
        b1 = self.beta_1
        m = self._zeros_if_none("m", delta)
        v = self._zeros_if_none("v", delta)
        self.m = [b1 * mi + (1 - b1) * d for mi, d in zip(m, delta)]
        self.v = [vi + d * d for vi, d in zip(v, delta)]
        return [
            xi + self.eta * mi / (np.sqrt(vi) + self.tau) for xi, mi, vi in zip(x, self.m, self.v)
        ]


OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    "sgd": ServerSGD, "fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad,
}
"""``federated.server_opt.name`` -> class (``conf/federated/server_opt/*.yaml``)."""


def settings_of(name: str) -> list[str]:
    """The keyword arguments the server optimiser ``name`` takes (its config keys)."""
    return [p for p in inspect.signature(OPTIMIZERS[name].__init__).parameters if p != "self"]


def create_server_optimizer(name: str, key: str = "federated.server_opt",
                            **settings: Any) -> ServerOptimizer:
    """The server optimiser ``name`` built from its ``settings`` (``key``: where they come from,
    for messages).

    Raises:
        ValueError: an unknown name, or a setting the optimiser does not take (each named
            ``<key>.<setting>``, with the settings it takes and the config that holds them).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"{key}.name={name} is not a server optimiser: use one of "
                         f"{sorted(OPTIMIZERS)} (federated/server_opt=<name>)")
    allowed = settings_of(name)
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise ValueError(
            f"{', '.join(f'{key}.{k}' for k in unknown)}: not a setting of server optimiser "
            f"{name} ({OPTIMIZERS[name].__name__}), which takes {allowed}. Pick its config "
            f"whole with federated/server_opt={name}, or remove the key(s)")
    return OPTIMIZERS[name](**settings)
