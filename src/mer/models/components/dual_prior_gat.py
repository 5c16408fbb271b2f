"""Graph attention whose weights mix learned attention with a prior (FED-PsyAU's dual prior)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import scatter, softmax


class DualPriorGATConv(MessagePassing):
    """Multi-head GAT layer with attention mixed with a prior over each node's neighbours.

    For a target node i with neighbours N(i) (the edges j -> i of ``edge_index``)::

        e_ij     = LeakyReLU(a_src . W x_j + a_dst . W x_i)           per head
        learned  = softmax_{j in N(i)}(e_ij)
        prior_ij = softmax_{j in N(i)}(p_ij)                          p: one weight per edge
        alpha_ij = (1 - m) * learned + m * prior_ij,  m = beta * prior_ratio (clipped to [0, 1])

    then alpha is renormalised over N(i) (a no-op up to rounding, as both terms are already
    distributions over N(i)) and ``out_i = sum_j alpha_ij W x_j`` (+ bias). With m = 0 this is
    plain GAT attention restricted to the given edges; with m = 1 it is the prior's softmax.
    ``prior_ratio`` is a plain attribute set from outside (a schedule decays it).

    ``mask="zero"`` reproduces the FED-PsyAU authors' layer (``gat_layers.py``) for the
    fidelity ablation: ``edge_index`` then holds *every* pair of the graph and ``edge_real``
    (E,) says which are edges. A non-edge's score is set to 0 (not -inf) before the softmax, so
    non-neighbours get attention ``exp(0) / Z``; the prior is zeroed off the edges, softmaxed
    over the whole row (each non-edge adds exp(0) = 1 to its denominator), then zeroed off the
    edges again; the mix is then L1-normalised over the row::

        learned_ij = exp(s_ij) / sum_k exp(s_ik),  s_ij = e_ij on edges, 0 elsewhere
        prior_ij   = [j in N(i)] exp(p_ij) / (sum_{k in N(i)} exp(p_ik) + #non-edges of i)

    mer's default ``mask="hard"`` keeps attention on the graph's edges: the psychological
    graph is the point of the prior, and the authors' version lets every node attend to
    every other one.

    Shapes:
        x: (N, in_channels): N nodes of one graph, or B graphs of n nodes batched as (B*n, F)
            with node ids offset by n per graph.
        edge_index: (2, E) int64, row 0 source j, row 1 target i. Every node should have at
            least one incoming edge (give self-loops); a node without any gets zeros + bias.
        prior: (E,) prior weight p_ij of each edge, or None for a uniform prior.
        edge_real: (E,) bool, only with ``mask="zero"``: which pairs are edges.
        output: (N, heads * out_channels) if ``concat`` else (N, out_channels); with
            ``return_attention_weights=True`` also ``(edge_index, alpha)``, alpha (E, heads)
            before attention dropout.
    """

    def __init__(
        self, in_channels: int, out_channels: int, heads: int = 1, concat: bool = True,
        beta: float = 0.3, negative_slope: float = 0.2, dropout: float = 0.0, bias: bool = True,
        mask: str = "hard",
    ) -> None:
        super().__init__(aggr="add", node_dim=0)
        if mask not in ("hard", "zero"):
            raise ValueError(f"DualPriorGATConv: mask must be 'hard' or 'zero', got {mask!r}")
        self.mask = mask
        self.in_channels, self.out_channels, self.heads = in_channels, out_channels, heads
        self.concat, self.beta = concat, beta
        self.negative_slope, self.dropout = negative_slope, dropout
        self.prior_ratio = 1.0
        self.lin = nn.Linear(in_channels, heads * out_channels, bias=False)
        self.att_src = nn.Parameter(torch.empty(1, heads, out_channels))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_channels))
        out_dim = heads * out_channels if concat else out_channels
        self.bias = nn.Parameter(torch.zeros(out_dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.xavier_uniform_(self.lin.weight)
        nn.init.xavier_uniform_(self.att_src)
        nn.init.xavier_uniform_(self.att_dst)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @property
    def mix(self) -> float:
        """m = beta * prior_ratio clipped to [0, 1]: the weight of the prior attention."""
        return min(max(float(self.beta) * float(self.prior_ratio), 0.0), 1.0)

    def attention(
        self, scores: torch.Tensor, prior: torch.Tensor | None, target: torch.Tensor,
        num_nodes: int, edge_real: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """alpha (E, H) from learned scores (E, H), prior (E,) or None, target ids (E,);
        ``edge_real`` (E,) bool under ``mask="zero"`` (None: every pair is an edge)."""
        if prior is None:
            prior = scores.new_zeros(scores.size(0))
        prior = prior.to(scores.dtype)
        if self.mask == "zero" and edge_real is not None:
            real = edge_real.bool()
            scores = torch.where(real.unsqueeze(-1), scores, torch.zeros_like(scores))
            prior = torch.where(real, prior, torch.zeros_like(prior))
            prior_att = softmax(prior, target, num_nodes=num_nodes)
            prior_att = torch.where(real, prior_att, torch.zeros_like(prior_att)).unsqueeze(-1)
        else:
            prior_att = softmax(prior, target, num_nodes=num_nodes).unsqueeze(-1)
        learned = softmax(scores, target, num_nodes=num_nodes)
        m = self.mix
        alpha = (1.0 - m) * learned + m * prior_att
        total = scatter(alpha, target, dim=0, dim_size=num_nodes, reduce="sum")
        return alpha / total[target].clamp(min=1e-12)

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, prior: torch.Tensor | None = None,
        return_attention_weights: bool = False, edge_real: torch.Tensor | None = None,
    ):
        n = x.size(0)
        h = self.lin(x).view(n, self.heads, self.out_channels)
        source, target = edge_index
        score_src = (h * self.att_src).sum(-1)  # (N, H)
        score_dst = (h * self.att_dst).sum(-1)
        scores = F.leaky_relu(score_src[source] + score_dst[target], self.negative_slope)
        alpha = self.attention(scores, prior, target, n, edge_real)
        dropped = F.dropout(alpha, p=self.dropout, training=self.training)
        out = self.propagate(edge_index, h=h, alpha=dropped, size=(n, n))  # (N, H, C)
        out = out.reshape(n, -1) if self.concat else out.mean(dim=1)
        if self.bias is not None:
            out = out + self.bias
        if return_attention_weights:
            return out, (edge_index, alpha)
        return out

    def message(self, h_j: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return h_j * alpha.unsqueeze(-1)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"heads={self.heads}, beta={self.beta}, prior_ratio={self.prior_ratio}, "
                f"mask={self.mask})")
