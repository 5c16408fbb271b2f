"""The part learned spotters share: build inputs, train a network by windows, score videos.

A subclass says which network (:meth:`LearnedSpotter.build_net`), which per-position inputs
(:meth:`LearnedSpotter.inputs`) and, when it has one, extra targets; training and sliding
inference are the same for all (``mer.spotting.module``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mer.spotting.base import TYPES, Spotter
from mer.spotting.module import (
    SpotModule,
    WindowSet,
    feature_scale,
    fit_module,
    sliding_scores,
    training_starts,
)
from mer.spotting.videos import SpotVideo, frame_features, gaussian_targets


class LearnedSpotter(Spotter):
    """A spotter with a network trained on training subjects' videos (LOSO: never the test
    subject); thresholds chosen on validation subjects carved from the training subjects."""

    learned = True

    def __init__(self, window: int = 64, epochs: int = 20, batch_size: int = 16,
                 lr: float = 1e-3, weight_decay: float = 1e-4, optimizer: str = "adam",
                 neg_ratio: float = 1.0, pos_weight: float = 4.0, target_width: float = 0.25,
                 net: dict | None = None, **kw) -> None:
        super().__init__(**kw)
        self.window, self.epochs, self.batch_size = int(window), int(epochs), int(batch_size)
        self.lr, self.weight_decay, self.optimizer = float(lr), float(weight_decay), optimizer
        self.neg_ratio, self.pos_weight = float(neg_ratio), float(pos_weight)
        self.target_width = float(target_width)
        self.net_kwargs = dict(net or {})
        self.module: SpotModule | None = None

    # -- to implement -------------------------------------------------------------------------

    def build_net(self, in_features: int, video: SpotVideo) -> nn.Module:
        raise NotImplementedError

    def inputs(self, video: SpotVideo) -> dict[str, np.ndarray]:
        """Per-position network inputs ``{key: (T, ...)}``; default the frame features divided
        by the network's ``feature_scale`` (set from the training videos)."""
        return {"x": frame_features(video) / self.module.net.feature_scale.numpy()}

    def make_module(self, net: nn.Module) -> SpotModule:
        return SpotModule(net, lr=self.lr, weight_decay=self.weight_decay,
                          optimizer=self.optimizer, pos_weight=self.pos_weight)

    def extra(self, video: SpotVideo):
        """Per-video function adding fixed-size training items (None: nothing)."""
        return None

    # -- shared ---------------------------------------------------------------------------------

    def setup(self, videos: list[SpotVideo]) -> None:
        """Build the network for the training videos (scale, sizes) without training it."""
        scale = feature_scale([frame_features(v) for v in videos])
        net = self.build_net(frame_features(videos[0]).shape[1], videos[0])
        net.register_buffer("feature_scale", torch.as_tensor(scale))
        self.module = self.make_module(net)

    def training_windows(self, videos: list[SpotVideo]
                         ) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        """The targets (T, 2) of ``videos`` and the (video, start) of every training window
        (seeded: the same windows every epoch and round)."""
        targets = [gaussian_targets(v, TYPES, self.target_width) for v in videos]
        rng = np.random.default_rng(self.seed)
        return targets, training_starts(targets, self.window, self.neg_ratio, rng)

    def training_set(self, videos: list[SpotVideo]) -> WindowSet:
        targets, starts = self.training_windows(videos)
        return WindowSet([self.inputs(v) for v in videos], targets, self.window, starts,
                         extra=[self.extra(v) for v in videos])

    def _train(self, videos: list[SpotVideo]) -> dict:
        self.setup(videos)
        return self.train_epochs(videos, self.epochs)

    def train_epochs(self, videos: list[SpotVideo], epochs: int, seed: int | None = None
                     ) -> dict:
        """Train the current network ``epochs`` more on ``videos`` (federated labs call this
        with their own videos and a seed per round)."""
        return fit_module(self.module, self.training_set(videos), epochs, self.batch_size,
                          self.seed if seed is None else seed)

    def _scores(self, video: SpotVideo) -> np.ndarray:
        return sliding_scores(self.module.net, self.inputs(video), self.window)
