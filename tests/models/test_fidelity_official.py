"""fidelity=official: each formula of the FED-PsyAU authors' code (MELABIPCAS/FED-PsyAU,
``Fed_Framework/``) against values worked out by hand here; mer's default beside it."""

import math

import numpy as np
import pytest
import torch

from mer.data.aus import PSYAU_AUS
from mer.engine.au_module import AUMERModule, official_prior_ratio
from mer.federated.aggregators import pfedprox_personalise
from mer.federated.fedprox import proximal_term
from mer.models.components import DualPriorGATConv
from mer.models.dpk_gat import DPKGAT, _GraphLevel
from mer.models.priors import level_prior, psych_adjacency

IDX = {au: i for i, au in enumerate(PSYAU_AUS)}


# -- FedProx term -----------------------------------------------------------------------------

def test_official_proximal_term_is_half_mu_times_the_sum_of_unsquared_norms():
    """w - a = ([3, 4], [[1, 1], [1, 1]]): norms 5 and 2. official (mu/2)(5 + 2) = 0.035 at
    mu = 0.01; mer (mu/2)(25 + 4) = 0.145. Gradients: official (mu/2)(w - a)/||w - a||, mer
    mu (w - a); at the anchor itself the official gradient is 0 (not NaN)."""
    w = [torch.tensor([3.0, 4.0], requires_grad=True),
         torch.ones(2, 2, requires_grad=True)]
    anchor = [torch.zeros(2), torch.zeros(2, 2)]
    official = proximal_term(w, anchor, 0.01, norm="l2")
    assert official.item() == pytest.approx(0.005 * 7.0, rel=1e-6)
    assert proximal_term(w, anchor, 0.01).item() == pytest.approx(0.005 * 29.0, rel=1e-6)
    official.backward()
    np.testing.assert_allclose(w[0].grad.numpy(), [0.005 * 0.6, 0.005 * 0.8], rtol=1e-6)
    np.testing.assert_allclose(w[1].grad.numpy(), np.full((2, 2), 0.005 * 0.5), rtol=1e-6)
    at = torch.zeros(3, requires_grad=True)
    proximal_term([at], [torch.zeros(3)], 0.01, norm="l2").backward()
    assert torch.equal(at.grad, torch.zeros(3))
    with pytest.raises(ValueError, match="norm must be 'squared' or 'l2'"):
        proximal_term(w, anchor, 0.01, norm="l1")


def test_the_module_adds_the_configured_proximal_norm():
    from mer.engine.module import MERModule

    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[3.0, 4.0]]))
    module = MERModule(net, num_classes=2)
    from mer.federated.fedprox import ProximalTerm

    module.loss_terms = [ProximalTerm(0.002, [torch.zeros(1, 2)], norm="l2")]
    assert float(module.extra_loss()) == pytest.approx(0.001 * 5.0)
    module.loss_terms = [ProximalTerm(0.002, [torch.zeros(1, 2)])]
    assert float(module.extra_loss()) == pytest.approx(0.001 * 25.0)


# -- P-FedProx mix ----------------------------------------------------------------------------

def test_official_pfedprox_mixes_parameters_only():
    """Two clients, entries (parameter, BN buffer): A = (1, 10) with n = 1, B = (3, 20) with
    n = 3, own 0.9. A's parameter: 0.9 * 1 + 0.1 * 3 = 1.2 under both; A's buffer: mer
    0.9 * 10 + 0.1 * 20 = 11, official keeps 10. B: 0.9 * 3 + 0.1 * 1 = 2.8; 20 or 19."""
    a = [np.array([1.0]), np.array([10.0])]
    b = [np.array([3.0]), np.array([20.0])]
    mer = pfedprox_personalise([a, b], [1, 3], own=0.9)
    official = pfedprox_personalise([a, b], [1, 3], own=0.9, mix=[True, False])
    np.testing.assert_allclose([mer[0][0][0], mer[0][1][0], mer[1][0][0], mer[1][1][0]],
                               [1.2, 11.0, 2.8, 19.0])
    np.testing.assert_allclose([official[0][0][0], official[0][1][0], official[1][0][0],
                                official[1][1][0]], [1.2, 10.0, 2.8, 20.0])
    with pytest.raises(ValueError, match="2 mix flags for 1 arrays"):
        pfedprox_personalise([a[:1], b[:1]], [1, 3], mix=[True, False])


# -- graph and priors -------------------------------------------------------------------------

def test_official_global_graph_adds_the_directed_au9_to_au2_entry():
    """The authors' global adjacency is mer's plus one directed entry: row AU9 (query) has a
    1 in column AU2, row AU2 none in column AU9. Their AU9 row attends to AU2, AU4, AU6, AU7
    and itself."""
    mer, official = psych_adjacency("global"), psych_adjacency("global", "official")
    assert torch.equal(mer, mer.T)
    diff = (official - mer).nonzero().tolist()
    assert diff == [[IDX[9], IDX[2]]]
    assert official[IDX[2], IDX[9]] == 0
    row9 = {PSYAU_AUS[j] for j in official[IDX[9]].nonzero().flatten().tolist()}
    assert row9 == {2, 4, 6, 7, 9}
    for scope in ("upper", "lower"):  # the within-half graphs agree
        assert torch.equal(psych_adjacency(scope), psych_adjacency(scope, "official"))
    with pytest.raises(ValueError, match="unknown fidelity 'paper'"):
        psych_adjacency("global", "paper")


# The authors' global prior rows AU1 and AU9 and their upper / lower prior rows AU1 and AU9
# (au_graph_mer.py, 4 decimals): the level rows are the block rows renormalised.
GLOBAL_AU1 = [0.3997, 0.3293, 0.0175, 0.2114, 0.0031, 0.0149,
              0.0008, 0.0028, 0.0099, 0.0039, 0.0017, 0.0051]
UPPER_AU1 = [0.4096, 0.3375, 0.0179, 0.2166, 0.0032, 0.0153]
GLOBAL_AU9 = [0.0084, 0.0000, 0.2989, 0.0140, 0.0335, 0.0782,
              0.4525, 0.0503, 0.0084, 0.0363, 0.0000, 0.0196]
LOWER_AU9 = [0.7980, 0.0887, 0.0148, 0.0640, 0.0000, 0.0345]


def test_official_level_priors_are_blocks_renormalised_per_row():
    prior = torch.zeros(12, 12)
    prior[IDX[1]] = torch.tensor(GLOBAL_AU1)
    prior[IDX[9]] = torch.tensor(GLOBAL_AU9)
    prior[IDX[2], :3] = torch.tensor([1.0, 1.0, 2.0])  # a row worked out by hand
    upper, lower = tuple(range(6)), tuple(range(6, 12))
    up = level_prior(prior, upper, renormalise=True)
    low = level_prior(prior, lower, renormalise=True)
    np.testing.assert_allclose(up[IDX[1], :6].numpy(), UPPER_AU1, atol=1.5e-4)
    np.testing.assert_allclose(low[IDX[9], 6:].numpy(), LOWER_AU9, atol=1.5e-4)
    np.testing.assert_allclose(up[IDX[2], :6].numpy(), [0.25, 0.25, 0.5, 0, 0, 0])
    assert torch.equal(up[IDX[1], 6:], prior[IDX[1], 6:])  # outside the block: untouched
    assert not up[IDX[4]].any()  # a row with no mass stays zero
    assert level_prior(prior, upper, renormalise=False) is prior  # mer: the raw block


# -- attention --------------------------------------------------------------------------------

def _one_target_attention(mask: str) -> torch.Tensor:
    """Node 0 of 3 attends over pairs (0<-0), (0<-1) real and (0<-2) not an edge; scores
    e = (1, 2, 5), prior p = (0.5, 0.2, 0.9), beta 0.3, r 1."""
    conv = DualPriorGATConv(2, 2, heads=1, beta=0.3, mask=mask)
    scores = torch.tensor([[1.0], [2.0], [5.0]])
    prior = torch.tensor([0.5, 0.2, 0.9])
    target = torch.zeros(3, dtype=torch.long)
    real = torch.tensor([True, True, False])
    return conv.attention(scores, prior, target, 3, real)[:, 0]


def test_official_attention_masks_non_edges_with_zero():
    """official: learned = softmax(1, 2, 0) (the non-edge's score 5 becomes 0, not -inf);
    prior = (e^.5, e^.2, 0) / (e^.5 + e^.2 + e^0) (the non-edge's zero counts in the
    denominator); alpha = 0.7 learned + 0.3 prior, L1-normalised: the non-neighbour keeps
    weight. mer (hard mask): the non-edge gets exactly 0."""
    z = math.e + math.e**2 + 1.0
    learned = [math.e / z, math.e**2 / z, 1.0 / z]
    zp = math.exp(0.5) + math.exp(0.2) + 1.0
    prior = [math.exp(0.5) / zp, math.exp(0.2) / zp, 0.0]
    mixed = [0.7 * a + 0.3 * b for a, b in zip(learned, prior)]
    expected = [m / sum(mixed) for m in mixed]  # ~ (0.3243, 0.6074, 0.0683)
    np.testing.assert_allclose(_one_target_attention("zero").numpy(), expected, rtol=1e-5)
    assert expected[2] == pytest.approx(0.0683, abs=1e-4)
    z2 = math.e + math.e**2
    zp2 = math.exp(0.5) + math.exp(0.2)
    hard = [0.7 * math.e / z2 + 0.3 * math.exp(0.5) / zp2,
            0.7 * math.e**2 / z2 + 0.3 * math.exp(0.2) / zp2]
    conv = DualPriorGATConv(2, 2, heads=1, beta=0.3)  # mer: only the real edges are given
    got = conv.attention(torch.tensor([[1.0], [2.0]]), torch.tensor([0.5, 0.2]),
                         torch.zeros(2, dtype=torch.long), 2)[:, 0]
    np.testing.assert_allclose(got.numpy(), hard, rtol=1e-5)


# -- levels, schedule, freezing ---------------------------------------------------------------

def test_official_level_is_three_hidden_heads_one_output_head_and_a_residual():
    adj = psych_adjacency("upper")
    level = _GraphLevel(tuple(range(6)), adj, dim=8, heads=2, beta=0.3, dropout=0.0,
                        fidelity="official")
    assert (level.hidden.heads, level.hidden.out_channels, level.conv.heads) == (3, 64, 1)
    assert level.hidden.bias is None and level.conv.bias is None
    assert not hasattr(level, "norm")
    assert level.edge_index.shape[1] == 36  # every pair of the 6 nodes
    assert int(level.edge_real.sum()) == int(adj[:6, :6].sum())
    with torch.no_grad():  # zero GAT weights: out = ELU(0) + h = h exactly (the residual)
        level.hidden.lin.weight.zero_()
        level.conv.lin.weight.zero_()
    h = torch.randn(2, 6, 8)
    assert torch.equal(level.eval()(h, torch.full((12, 12), 1 / 12)), h)


def test_official_prior_ratio_schedule_is_a_product():
    """r_e = r_(e-1) (1 - (e+1)/E) with E = 4, r0 = 1: 0.75, 0.375, 0.09375, 0; mer's
    linear decay: 1, 0.75, 0.5, 0.25."""
    assert [official_prior_ratio(1.0, e, 4) for e in range(4)] == \
        pytest.approx([0.75, 0.375, 0.09375, 0.0])
    net = DPKGAT(fidelity="official")
    module = AUMERModule(net, 3, prior_schedule="decay", prior_ratio0=1.0)
    assert module.prior_schedule == "official"
    assert [module.prior_ratio_at(e, 4) for e in range(4)] == \
        pytest.approx([0.75, 0.375, 0.09375, 0.0])
    mer = AUMERModule(DPKGAT(), 3, prior_schedule="decay", prior_ratio0=1.0)
    assert [mer.prior_ratio_at(e, 4) for e in range(4)] == pytest.approx([1, 0.75, 0.5, 0.25])
    fixed = AUMERModule(DPKGAT(fidelity="official"), 3, prior_schedule="fixed",
                        prior_ratio0=0.3)
    assert fixed.prior_ratio_at(3, 4) == 0.3  # federated: held fixed in both


def test_official_dpk_gat_builds_and_freezes_its_au_model():
    torch.manual_seed(0)
    net = DPKGAT(fidelity="official", freeze_au=True)
    net.set_prior_ratio(0.3)
    assert all(c.prior_ratio == 0.3 for lvl in net.levels for c in lvl.convs())
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"au_stream", "flow_stream", "classifier"}
    out = net(torch.randn(4, 3, 28, 28))
    assert out.logits.shape == (4, 3) and out.au_logits.shape == (4, 12)
    loss = out.logits.sum() + out.au_logits.sum() + out.au_aux_logits.sum()
    loss.backward()
    assert all(p.grad is None for n, p in net.named_parameters() if not p.requires_grad)
    glob = net.levels[2]
    i9, i2 = IDX[9], IDX[2]
    pairs = list(zip(glob.edge_index[1].tolist(), glob.edge_index[0].tolist()))
    assert glob.edge_real[pairs.index((i9, i2))] and not glob.edge_real[pairs.index((i2, i9))]
    # mer's network keeps its state layout (checkpoints) and trains everything
    mer = DPKGAT()
    assert all(p.requires_grad for p in mer.parameters())
    assert "levels.0.norm.weight" in mer.state_dict()
    assert "levels.0.hidden.lin.weight" in net.state_dict()
