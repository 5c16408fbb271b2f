"""ME-TST: synergistic spotting and recognition via temporal state transition (Zou, Guo et al.,
ICASSP 2025).

Instead of classifying fixed windows, a state-space model (Mamba, from ``mambapy``: pure
PyTorch, parallel scan on CPU) runs over the per-frame features of long stretches of video
(video-level regression) and a per-frame head regresses the apex score; a recognition head
classifies each interval's emotion from the *same* temporal features (mean over the
interval), and its loss shapes them: ``loss = 0.9 * MSE(spotting) + 0.1 * weighted CE
(recognition)`` (class weights: inverse training frequency). Recognition of a spotted
interval (:meth:`METSTSpotter.recognise`) uses those features again.

Network (:class:`METSTNet`), B sequences of W positions, C features per position (ROI flow
(u, v) and the face magnitude):
``x (B, W, C) -> linear (B, W, d) -> Mamba forward and Mamba over the reversed sequence,
concatenated (B, W, 2d) = trunk features -> spotting head (B, W, 2) sigmoid``;
``recognition: trunk features mean-pooled over each span (B, M, 2d) -> head (B, M, K)``.
The paper's model is causal in one direction; spotting a frame needs what follows it (the
return to neutral), hence the second, reversed scan (written down here).

The selective scan (per channel, state size N): ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``,
``y_t = C_t . h_t + D x_t``; tested against that recurrence step by step.
"""

from __future__ import annotations

import numpy as np
import torch
from mambapy.mamba import Mamba, MambaConfig
from torch import nn
from torch.nn import functional as F

from mer.spotting.base import register_spotter
from mer.spotting.labels import CLASSES, emotion_class
from mer.spotting.learned import LearnedSpotter
from mer.spotting.module import SpotModule, sliding_scores
from mer.spotting.videos import SpotVideo

MAX_SPANS = 8


class METSTNet(nn.Module):
    """Trunk (bidirectional Mamba over time) + spotting head + recognition head.

    Args:
        in_features: C.
        d_model: d.
        n_layers, d_state: Mamba layers and state size N.
        num_classes: K emotion classes.
        dropout: before the heads.
    """

    def __init__(self, in_features: int, d_model: int = 32, n_layers: int = 2,
                 d_state: int = 8, num_classes: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        cfg = MambaConfig(d_model=d_model, n_layers=n_layers, d_state=d_state, expand_factor=2)
        self.embed = nn.Linear(in_features, d_model)
        self.forward_ssm = Mamba(cfg)
        self.backward_ssm = Mamba(cfg)
        self.drop = nn.Dropout(dropout)
        self.spot_head = nn.Sequential(nn.Linear(2 * d_model, d_model), nn.GELU(),
                                       nn.Linear(d_model, 2))
        self.rec_head = nn.Sequential(nn.Linear(2 * d_model, d_model), nn.GELU(),
                                      nn.Linear(d_model, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, W, C) -> (B, W, 2d) trunk features."""
        h = self.embed(x)
        fwd = self.forward_ssm(h)
        bwd = self.backward_ssm(h.flip(1)).flip(1)
        return torch.cat([fwd, bwd], dim=-1)

    def spot(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.spot_head(self.drop(feats)))

    def recognise(self, feats: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
        """Logits (B, M, K) of spans (B, M, 2) ``[start, end]`` positions (inclusive; rows
        with start < 0 give logits that callers ignore)."""
        w = feats.shape[1]
        pos = torch.arange(w, device=feats.device)
        inside = ((pos[None, None] >= spans[..., :1]) & (pos[None, None] <= spans[..., 1:])
                  ).float()                                                     # (B, M, W)
        pooled = inside @ feats / inside.sum(-1, keepdim=True).clamp(min=1)     # (B, M, 2d)
        return self.rec_head(self.drop(pooled))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.spot(self.features(batch["x"]))


class METSTModule(SpotModule):
    """``0.9 * spotting MSE + 0.1 * weighted CE`` (weights ``w_spot``, ``w_rec``)."""

    def __init__(self, net: METSTNet, class_weights: torch.Tensor, w_spot: float = 0.9,
                 w_rec: float = 0.1, **kw) -> None:
        super().__init__(net, **kw)
        self.register_buffer("class_weights", class_weights.float())
        self.w_spot, self.w_rec = w_spot, w_rec

    def recognition_loss(self, feats: torch.Tensor, batch: dict) -> torch.Tensor:
        labels = batch["labels"]
        if not (labels >= 0).any():
            return feats.sum() * 0.0
        logits = self.net.recognise(feats, batch["spans"])
        keep = labels >= 0
        return F.cross_entropy(logits[keep], labels[keep], weight=self.class_weights)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = self.net.features(batch["x"])
        spot = self.spotting_loss(self.net.spot(feats), batch)
        return self.w_spot * spot + self.w_rec * self.recognition_loss(feats, batch)


@register_spotter("me_tst")
class METSTSpotter(LearnedSpotter):
    """ME-TST; ``net``: kwargs of :class:`METSTNet`; ``classes``: recognition classes;
    ``w_spot``/``w_rec``: the loss weights (0.9 / 0.1)."""

    def __init__(self, classes: list[str] | None = None, w_spot: float = 0.9,
                 w_rec: float = 0.1, **kw) -> None:
        kw.setdefault("window", 256)
        super().__init__(**kw)
        self.classes = list(classes or CLASSES)
        self.w_spot, self.w_rec = float(w_spot), float(w_rec)
        self.class_weights = torch.ones(len(self.classes))

    def build_net(self, in_features: int, video: SpotVideo) -> nn.Module:
        return METSTNet(in_features, num_classes=len(self.classes), **self.net_kwargs)

    def make_module(self, net: nn.Module) -> SpotModule:
        return METSTModule(net, self.class_weights, self.w_spot, self.w_rec, lr=self.lr,
                           weight_decay=self.weight_decay, optimizer=self.optimizer,
                           pos_weight=self.pos_weight)

    def labelled_spans(self, video: SpotVideo) -> tuple[np.ndarray, np.ndarray]:
        """Positions ``[onset, offset]`` (M, 2) and class index (M,) of the ground truths
        whose emotion has a class."""
        spans, labels = [], []
        for r in video.gt.itertuples():
            c = emotion_class(r.emotion, self.classes)
            if c is not None:
                spans.append(video.positions([r.onset, r.offset]))
                labels.append(self.classes.index(c))
        return np.array(spans, dtype=np.int64).reshape(-1, 2), np.array(labels, dtype=np.int64)

    def extra(self, video: SpotVideo):
        spans, labels = self.labelled_spans(video)

        def items(start: int, end: int) -> dict[str, torch.Tensor]:
            s = np.full((MAX_SPANS, 2), -1, dtype=np.int64)
            y = np.full(MAX_SPANS, -1, dtype=np.int64)
            inside = np.nonzero((spans[:, 0] >= start) & (spans[:, 1] < end))[0][:MAX_SPANS]
            s[: len(inside)] = spans[inside] - start
            y[: len(inside)] = labels[inside]
            return {"spans": torch.as_tensor(s), "labels": torch.as_tensor(y)}

        return items

    def setup(self, videos: list[SpotVideo]) -> None:
        counts = np.zeros(len(self.classes))
        for v in videos:
            for c in self.labelled_spans(v)[1]:
                counts[c] += 1
        w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(self.classes), 0.0)
        self.class_weights = torch.as_tensor(w / w[w > 0].mean() if (w > 0).any() else
                                             np.ones(len(self.classes)), dtype=torch.float32)
        super().setup(videos)

    def _scores(self, video: SpotVideo) -> np.ndarray:
        """Video-level: the whole video in one pass (sliding windows of 4096 beyond that)."""
        inputs = self.inputs(video)
        return sliding_scores(self.module.net, inputs, max(self.window, min(video.length, 4096)),
                              batch_size=1)

    @torch.no_grad()
    def recognise(self, video: SpotVideo, intervals: np.ndarray) -> list[str]:
        """Class of each interval (N, 2) ``[onset, offset]`` frame numbers, from the trunk
        features of the whole video."""
        if len(intervals) == 0:
            return []
        v = self.prepare(video)
        net = self.module.net
        was = net.training
        net.eval()
        x = torch.as_tensor(self.inputs(v)["x"])[None]
        feats = net.features(x)
        spans = torch.as_tensor(np.stack([v.positions(np.asarray(intervals)[:, 0]),
                                          v.positions(np.asarray(intervals)[:, 1])], 1))[None]
        pred = net.recognise(feats, spans)[0].argmax(-1).tolist()
        net.train(was)
        return [self.classes[i] for i in pred]
