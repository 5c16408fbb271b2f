"""What a client sends after local training and what it keeps between rounds."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Weights = list[np.ndarray]


@dataclass
class ClientUpdate:
    """What one client sends back after local training."""

    name: str
    weights: Weights
    num_examples: int
    steps: int
    seconds: float
    work: float = 1.0
    control_delta: Weights | None = None  # SCAFFOLD's dc_i
    new_control: Weights | None = None    # SCAFFOLD's c_i+, kept only if the update is accepted


@dataclass
class ClientState:
    """What a client keeps between rounds (never sent as such)."""

    personal: Weights | None = None     # P-FedProx personalised model
    last: Weights | None = None         # its last local model (FedBN keeps its BN entries)
    control: Weights | None = None      # SCAFFOLD's c_i
    flags: dict = field(default_factory=dict)
