"""DPK-GAT, the network of FED-PsyAU (Li, Qian, Zhao, Wang, ICCV 2025), written for mer.

Pipeline for a flow image x (B, 3, S, S) (u, v, strain; S = 28 from a flow cache or 128):

1. Landmark patches: a 5x5 flow patch (at 28 px scale; proportionally larger at other sizes,
   then area-resized to 5x5) around each landmark of four AU regions (brows, eyes/cheeks,
   nose, mouth/chin), sampled with ``grid_sample`` -> a small shared CNN -> one token per
   landmark (+ a learned landmark embedding) -> a transformer encoder layer over the tokens.
2. Landmark-to-AU: each region's tokens are mean-pooled and projected to that region's AU
   nodes: 12 nodes (PSYAU_AUS order), each a ``node_dim`` vector; an auxiliary AU head.
3. Hierarchical dual-prior graph attention (:class:`DualPriorGATConv`): one layer over the 6
   upper-face AUs, one over the 6 lower-face AUs, then a global one over all 12 on the
   psychological upper <-> lower edges (``hierarchical=False``: one layer on the union graph).
   Edges come from the psychological prior (or a full graph); each edge carries a data-prior
   weight (the row-normalised training co-occurrence, or uniform).
4. Heads: the final AU head (12 logits) on the graph node features, and a two-stream
   Inception-style emotion head: one stream on the 12 AU-relation node features, one on the
   flow resized to 28x28; concatenated -> classifier.

``fidelity="official"`` builds the graph part as the authors' released code does (README table
"FED-PsyAU: mer vs the authors' code"): the global graph's extra AU9 -> AU2 entry, upper / lower
priors renormalised per row within their block, attention that masks non-edges with 0 (not
-inf), and per level a 3-head hidden GAT + a 1-head output GAT + a residual (no LayerNorm).
``freeze_au=True`` freezes everything but the emotion head (the authors' federated model).

Landmarks are (B, 68, 2) pixel coordinates (x, y) in x's frame, iBUG 68-point order, pixel
centres at integer coordinates. Without landmarks the canonical template
:data:`mer.data.landmarks.FACE_TEMPLATE_68` (a schematic aligned face, unit coordinates) places
the patches.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from mer.data.aus import PSYAU_AUS
from mer.data.landmarks import FACE_TEMPLATE_68
from mer.models.priors import check_fidelity, level_prior, psych_adjacency
from mer.models.registry import register_model

# The landmarks (iBUG indices) of each AU region and the AU nodes it feeds. Region order makes
# the AU nodes come out in PSYAU_AUS order.
AU_REGIONS: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = (
    ("brows", tuple(range(17, 27)), (1, 2, 4)),
    ("eyes_cheeks", tuple(range(36, 48)) + (1, 2, 14, 15), (5, 6, 7)),  # jaw 1,2,14,15: cheeks
    ("nose", tuple(range(27, 36)), (9, 10)),
    ("mouth_chin", tuple(range(48, 60)) + (7, 8, 9), (12, 14, 15, 17)),
)
assert tuple(au for _, _, aus in AU_REGIONS for au in aus) == PSYAU_AUS
REGION_LANDMARKS: tuple[int, ...] = tuple(i for _, points, _ in AU_REGIONS for i in points)
PATCH = 5  # patch side at 28 px scale
N_AU = len(PSYAU_AUS)
# The authors' GAT per level: 3 hidden heads of 64 features, then one output head.
OFFICIAL_HEADS, OFFICIAL_HIDDEN = 3, 64


class DPKGATOutput(NamedTuple):
    """logits (B, K) emotion; au_logits (B, 12) final AU head; au_aux_logits (B, 12)."""

    logits: torch.Tensor
    au_logits: torch.Tensor
    au_aux_logits: torch.Tensor


def landmark_patches(x: torch.Tensor, points: torch.Tensor, side: int) -> torch.Tensor:
    """Bilinear ``side`` x ``side`` patches at 1-pixel spacing around each point.

    x (B, C, H, W); points (B, L, 2) pixel (x, y), pixel centres at integers -> (B, L, C, side,
    side). Differentiable in x and points; outside the image reads zeros.
    """
    b, c, h, w = x.shape
    offsets = torch.arange(side, device=x.device, dtype=x.dtype) - (side - 1) / 2
    gx = points[..., 0, None, None] + offsets.view(1, 1, 1, side)  # (B, L, 1, side)
    gy = points[..., 1, None, None] + offsets.view(1, 1, side, 1)  # (B, L, side, 1)
    gx, gy = torch.broadcast_tensors(gx, gy)
    # pixel -> grid_sample's [-1, 1] with align_corners=False (image edges at -1 and 1)
    grid = torch.stack([(gx + 0.5) / w * 2 - 1, (gy + 0.5) / h * 2 - 1], dim=-1)
    n = points.shape[1]
    out = F.grid_sample(x, grid.reshape(b, n * side, side, 2), mode="bilinear",
                        padding_mode="zeros", align_corners=False)  # (B, C, L*side, side)
    return out.view(b, c, n, side, side).permute(0, 2, 1, 3, 4)


class _Inception(nn.Module):
    """Parallel 1 / 3 / 5 convolutions and a 3-max-pool + 1 branch, concatenated, BN, ReLU.

    ``dims`` 2: (B, C, H, W) -> (B, 4 * branch, H, W); ``dims`` 1: (B, C, L) -> (B, 4b, L).
    """

    def __init__(self, in_channels: int, branch: int, dims: int = 2) -> None:
        super().__init__()
        conv, pool, norm = ((nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d) if dims == 2 else
                            (nn.Conv1d, nn.MaxPool1d, nn.BatchNorm1d))
        self.branches = nn.ModuleList([
            conv(in_channels, branch, 1),
            conv(in_channels, branch, 3, padding=1),
            conv(in_channels, branch, 5, padding=2),
            nn.Sequential(pool(3, stride=1, padding=1), conv(in_channels, branch, 1)),
        ])
        self.norm = norm(4 * branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(torch.cat([b(x) for b in self.branches], dim=1)))


class _NodeHead(nn.Module):
    """One logit per node from its own weights: (B, n, D) -> (B, n)."""

    def __init__(self, nodes: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nodes, dim) / math.sqrt(dim))
        self.bias = nn.Parameter(torch.zeros(nodes))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h * self.weight).sum(-1) + self.bias


class _GraphLevel(nn.Module):
    """Graph attention over a subset of the AU nodes.

    adjacency (12, 12): entry [i, j] = 1 gives the edge j -> i (node i attends to j). The prior
    weight of edge j -> i is ``prior[i, j]`` of the (12, 12) matrix passed to ``forward``.

    ``fidelity="mer"``: one multi-head DualPriorGATConv on the edges (hard mask), then
    ``LayerNorm(h + ELU(gat(h)))``. ``fidelity="official"`` (the authors' ``GAT_based_on_
    dynamic_prior_knowledge`` plus the residual of ``au_graph_mer.py``)::

        z   = ELU(concat_3 heads gat_k(dropout(h)))          hidden: 3 x 64, no bias
        out = ELU(gat_out(dropout(z))) + h                    output: 1 head, no bias

    over every pair of the level's nodes with non-edges masked by 0 (``mask="zero"``), and
    the level's prior renormalised per row within its block (:func:`level_prior`).
    """

    def __init__(self, nodes: tuple[int, ...], adjacency: torch.Tensor, dim: int, heads: int,
                 beta: float, dropout: float, fidelity: str = "mer") -> None:
        # imported here: torch_geometric takes seconds to import, and the registry imports
        # every model module whenever any model is built
        from mer.models.components import DualPriorGATConv

        super().__init__()
        self.official = fidelity == "official"
        idx = torch.tensor(nodes)
        block = adjacency[idx][:, idx]
        if self.official:  # every pair; edge_real marks the graph's edges
            target, source = torch.ones_like(block).nonzero(as_tuple=True)
        else:
            target, source = block.nonzero(as_tuple=True)
        self.register_buffer("nodes", idx, persistent=False)
        self.register_buffer("edge_index", torch.stack([source, target]), persistent=False)
        self.register_buffer("edge_real", block[target, source] > 0, persistent=False)
        if self.official:
            self.dropout = dropout
            self.hidden = DualPriorGATConv(dim, OFFICIAL_HIDDEN, heads=OFFICIAL_HEADS,
                                           beta=beta, dropout=dropout, bias=False, mask="zero")
            self.conv = DualPriorGATConv(OFFICIAL_HEADS * OFFICIAL_HIDDEN, dim, heads=1,
                                         concat=False, beta=beta, dropout=dropout, bias=False,
                                         mask="zero")
        else:
            self.conv = DualPriorGATConv(dim, dim // heads, heads=heads, beta=beta,
                                         dropout=dropout)
            self.norm = nn.LayerNorm(dim)

    def convs(self) -> list[nn.Module]:
        """The level's graph attention layers (for the prior ratio)."""
        return [self.hidden, self.conv] if self.official else [self.conv]

    def forward(self, h: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """h (B, n, D) features of this level's nodes, prior (12, 12) -> (B, n, D)."""
        b, n, d = h.shape
        e = self.edge_index.shape[1]
        offsets = (torch.arange(b, device=h.device) * n).repeat_interleave(e)
        edge_index = self.edge_index.repeat(1, b) + offsets
        source, target = self.nodes[self.edge_index[0]], self.nodes[self.edge_index[1]]
        if not self.official:
            weights = prior[target, source].repeat(b)
            out = self.conv(h.reshape(b * n, d), edge_index, weights).view(b, n, d)
            return self.norm(h + F.elu(out))
        weights = level_prior(prior, self.nodes.tolist(), True)[target, source].repeat(b)
        real = self.edge_real.repeat(b)
        z = F.dropout(h.reshape(b * n, d), self.dropout, self.training)
        z = F.elu(self.hidden(z, edge_index, weights, edge_real=real))
        z = F.dropout(z, self.dropout, self.training)
        out = self.conv(z, edge_index, weights, edge_real=real).view(b, n, d)
        return F.elu(out) + h


@register_model("dpk_gat")
class DPKGAT(nn.Module):
    """DPK-GAT: landmark patches -> AU nodes -> hierarchical dual-prior GAT -> emotion + AUs.

    ``forward(x, landmarks=None)``: x (B, in_channels, S, S) with S = ``input_size``,
    landmarks (B, 68, 2) pixel coordinates or None (template) -> :class:`DPKGATOutput`.

    Args:
        input_size: S, the side of the flow images (28 or 128; others work too).
        node_dim, heads: AU node width and graph attention heads (node_dim % heads == 0).
        token_dim: width of the landmark tokens.
        prior_beta, prior_ratio: the prior attention weight is beta * r (see
            :class:`DualPriorGATConv`); r is changed during training with
            :meth:`set_prior_ratio`.
        use_psych_prior: psychological adjacency (False: fully connected graphs).
        use_data_prior: edge prior weights from :meth:`set_data_prior` (uniform until it is
            called); False: uniform prior weights over the adjacency.
        hierarchical: upper, lower, then global graph; False: one flat graph.
        fidelity: ``mer`` (default) or ``official``: the graph part as the authors' code
            builds it (module notes; ``heads`` is then unused: 3 hidden + 1 output head).
        freeze_au: freeze the AU part (patches, landmark encoder, AU nodes, graph levels, AU
            heads); only the emotion head trains, as in the authors' federated code (None:
            False; a federated run under fidelity=official sets True).
    """

    uses_aus = True

    def __init__(
        self, num_classes: int = 3, in_channels: int = 3, input_size: int = 28,
        node_dim: int = 32, heads: int = 2, prior_beta: float = 0.3, prior_ratio: float = 1.0,
        use_psych_prior: bool = True, use_data_prior: bool = True, hierarchical: bool = True,
        dropout: float = 0.2, token_dim: int = 64, fidelity: str = "mer",
        freeze_au: bool | None = False,
    ) -> None:
        super().__init__()
        check_fidelity(fidelity)
        self.fidelity = fidelity
        if node_dim % heads:
            raise ValueError(f"node_dim ({node_dim}) must be a multiple of heads ({heads})")
        self.input_size, self.use_data_prior = input_size, use_data_prior
        self.hierarchical = hierarchical
        n_points = len(REGION_LANDMARKS)
        self.register_buffer("landmark_ids", torch.tensor(REGION_LANDMARKS), persistent=False)
        self.register_buffer("template", FACE_TEMPLATE_68.clone(), persistent=False)
        # the data prior is part of the model state: it travels with checkpoints
        self.register_buffer("data_prior", torch.full((N_AU, N_AU), 1.0 / N_AU))

        self.patch_cnn = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.ReLU(inplace=True),  # 5x5 -> 3x3
            nn.Flatten(), nn.Linear(32 * 3 * 3, token_dim),
        )
        self.landmark_embedding = nn.Parameter(torch.randn(1, n_points, token_dim) * 0.02)
        self.landmark_encoder = nn.TransformerEncoderLayer(
            token_dim, nhead=4, dim_feedforward=2 * token_dim, dropout=dropout,
            batch_first=True, norm_first=True,
        )
        self.region_sizes = [len(points) for _, points, _ in AU_REGIONS]
        self.to_nodes = nn.ModuleList(
            nn.Linear(token_dim, len(aus) * node_dim) for _, _, aus in AU_REGIONS
        )
        self.node_dim = node_dim
        self.aux_au_head = _NodeHead(N_AU, node_dim)

        def adjacency(scope: str) -> torch.Tensor:
            return psych_adjacency(scope, fidelity) if use_psych_prior else \
                torch.ones(N_AU, N_AU)

        level = dict(dim=node_dim, heads=heads, beta=prior_beta, dropout=dropout,
                     fidelity=fidelity)
        upper, lower, every = tuple(range(6)), tuple(range(6, 12)), tuple(range(N_AU))
        if hierarchical:
            self.levels = nn.ModuleList([
                _GraphLevel(upper, adjacency("upper"), **level),
                _GraphLevel(lower, adjacency("lower"), **level),
                _GraphLevel(every, adjacency("global"), **level),
            ])
        else:
            self.levels = nn.ModuleList([_GraphLevel(every, adjacency("flat"), **level)])
        self.au_head = _NodeHead(N_AU, node_dim)

        self.au_stream = _Inception(node_dim, 8, dims=1)  # over the 12 nodes: (B, 32, 12)
        self.flow_stream = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 28 -> 14
            _Inception(16, 16, dims=2),  # (B, 64, 14, 14)
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),  # (B, 256): the face's four quadrants
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * N_AU + 64 * 4, 64), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(64, num_classes),
        )
        self.set_prior_ratio(prior_ratio)
        if freeze_au:
            self.freeze_au_model()

    EMOTION_PARTS: tuple[str, ...] = ("au_stream", "flow_stream", "classifier")

    def freeze_au_model(self) -> None:
        """``requires_grad=False`` on every parameter outside the emotion head
        (:attr:`EMOTION_PARTS`); batch-norm statistics still update in training mode, as in
        the authors' code."""
        for name, p in self.named_parameters():
            if name.split(".")[0] not in self.EMOTION_PARTS:
                p.requires_grad_(False)

    @property
    def prior_ratio(self) -> float:
        return self._prior_ratio

    def set_prior_ratio(self, r: float) -> None:
        """Set the prior ratio r of every graph layer (prior attention weight beta * r)."""
        self._prior_ratio = float(r)
        for level in self.levels:
            for conv in level.convs():
                conv.prior_ratio = float(r)

    def set_data_prior(self, prior: torch.Tensor) -> None:
        """Use ``prior`` (12, 12), row i the distribution P(j | i) (``priors.data_prior``)."""
        prior = torch.as_tensor(prior, dtype=torch.float32)
        if prior.shape != (N_AU, N_AU):
            raise ValueError(f"data prior must be ({N_AU}, {N_AU}) over PSYAU_AUS, got "
                             f"{tuple(prior.shape)}; build it with mer.models.priors.data_prior")
        self.data_prior.copy_(prior)

    def au_nodes(self, x: torch.Tensor, landmarks: torch.Tensor | None) -> torch.Tensor:
        """Landmark patches -> tokens -> AU node features (B, 12, node_dim)."""
        b, _, s, _ = x.shape
        if landmarks is None:
            landmarks = (self.template * s - 0.5).to(x.dtype).expand(b, -1, -1)
        elif landmarks.shape[1:] != (68, 2) or landmarks.shape[0] != b:
            raise ValueError(f"landmarks must be ({b}, 68, 2) pixel coordinates in x's frame, "
                             f"got {tuple(landmarks.shape)}")
        points = landmarks[:, self.landmark_ids].to(x.dtype)  # (B, L, 2)
        side = PATCH if s == 28 else 2 * round(PATCH * s / 28 / 2 - 0.5) + 1  # odd, ~5 s/28
        patches = landmark_patches(x, points, side)  # (B, L, C, side, side)
        n = patches.shape[1]
        patches = patches.reshape(b * n, -1, side, side)
        if side != PATCH:
            patches = F.adaptive_avg_pool2d(patches, PATCH)
        tokens = self.patch_cnn(patches).view(b, n, -1) + self.landmark_embedding
        tokens = self.landmark_encoder(tokens)
        regions = tokens.split(self.region_sizes, dim=1)
        nodes = [proj(r.mean(dim=1)).view(b, -1, self.node_dim)
                 for proj, r in zip(self.to_nodes, regions)]
        return torch.cat(nodes, dim=1)

    def forward(self, x: torch.Tensor, landmarks: torch.Tensor | None = None) -> DPKGATOutput:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"DPKGAT was built for {self.input_size}x{self.input_size} input, "
                             f"got {tuple(x.shape[-2:])}; set model.kwargs.input_size")
        nodes = self.au_nodes(x, landmarks)
        aux = self.aux_au_head(nodes)
        prior = self.data_prior if self.use_data_prior else torch.ones_like(self.data_prior)
        if self.hierarchical:
            upper, lower, global_level = self.levels
            h = torch.cat([upper(nodes[:, :6], prior), lower(nodes[:, 6:], prior)], dim=1)
            h = global_level(h, prior)
        else:
            h = self.levels[0](nodes, prior)
        flow = x if x.shape[-1] == 28 else F.interpolate(x, size=(28, 28), mode="area")
        features = torch.cat([self.au_stream(h.transpose(1, 2)).flatten(1),
                              self.flow_stream(flow)], dim=1)
        return DPKGATOutput(self.classifier(features), self.au_head(h), aux)

    @staticmethod
    def au_loss(output: DPKGATOutput, au_target: torch.Tensor,
                au_mask: torch.Tensor) -> torch.Tensor:
        return au_loss(output, au_target, au_mask)


def au_loss(output: DPKGATOutput, au_target: torch.Tensor, au_mask: torch.Tensor) -> torch.Tensor:
    """Multi-label AU loss: BCE-with-logits of the final head plus that of the auxiliary head.

    au_target (B, 12) multi-hot; au_mask (B,) bool, True where the sample's AUs are annotated.
    Each head's BCE is averaged over the 12 AUs of the annotated samples only; the targets of
    masked samples are never read (they may hold anything, even NaN). With no annotated sample
    the loss is 0 (still attached to the graph, zero gradient).
    """
    mask = au_mask.bool()
    target = au_target[mask].to(output.au_logits.dtype)
    count = mask.sum().clamp(min=1) * au_target.shape[1]
    total = output.au_logits.new_zeros(())
    for logits in (output.au_logits, output.au_aux_logits):
        total = total + F.binary_cross_entropy_with_logits(
            logits[mask], target, reduction="sum") / count
    return total
