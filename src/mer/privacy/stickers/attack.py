"""The black-box recogniser the attacker faces: flow images in, a predicted class out.

The attacker sees nothing of the recogniser but its output, and may ask about each clip once
per attack (``budget`` queries per (attack, clip)); :class:`BlackBox` counts every query and
refuses one over the budget, so the audit can show (and a test assert) that causal placement
needs a single query per protected clip, plus one per reference clip for the discovery.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np


class QueryBudgetError(RuntimeError):
    """The attacker asked about a clip more often than the budget allows."""


class BlackBox:
    """A recogniser behind a query counter.

    Args:
        predict: (x (B, C, S, S) float32, landmarks (B, 68, 2) or None) -> (B,) class indices.
        budget: queries allowed per (attack, clip).
    """

    def __init__(self, predict: Callable[[np.ndarray, np.ndarray | None], np.ndarray],
                 budget: int = 1) -> None:
        self._predict = predict
        self.budget = int(budget)
        self.counts: Counter[tuple[str, str]] = Counter()

    def query(self, attack: str, clips: list[str], x: np.ndarray,
              landmarks: np.ndarray | None = None) -> np.ndarray:
        """Predicted classes (B,) of the flow images ``x`` of ``clips`` (B names) under the
        attack ``attack``; one query per clip."""
        if len(clips) != len(x):
            raise ValueError(f"{len(clips)} clip names for {len(x)} flow images")
        over = [c for c, k in Counter(clips).items() if self.counts[(attack, c)] + k > self.budget]
        if over:
            raise QueryBudgetError(f"attack {attack!r}: clip {over[0]} would be queried more than "
                                   f"{self.budget} time(s)" + (f" (and {len(over) - 1} more)"
                                                               if len(over) > 1 else ""))
        for c in clips:
            self.counts[(attack, c)] += 1
        return np.asarray(self._predict(np.asarray(x, np.float32), landmarks), dtype=np.int64)

    @property
    def total(self) -> int:
        """All queries so far."""
        return int(sum(self.counts.values()))

    def per_clip_max(self) -> int:
        """The most queries any clip got in any one attack (0 before any)."""
        return max(self.counts.values(), default=0)
