import numpy as np
import pytest
import torch

from mer.data.aus import PSYAU_AUS, multi_hot
from mer.models.priors import cooccurrence_counts, data_prior, psych_adjacency

IDX = {au: i for i, au in enumerate(PSYAU_AUS)}


def linked(adj: torch.Tensor, a: int, b: int) -> bool:
    return bool(adj[IDX[a], IDX[b]] == 1)


@pytest.mark.parametrize("scope", ["upper", "lower", "global", "flat"])
def test_adjacency_is_symmetric_binary_with_self_loops(scope):
    adj = psych_adjacency(scope)
    assert adj.shape == (12, 12)
    assert set(adj.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(adj, adj.T)
    assert torch.all(adj.diagonal() == 1)


def test_published_edges_and_counts():
    upper, lower, glob, flat = (psych_adjacency(s) for s in ("upper", "lower", "global", "flat"))
    # AU1-AU2-AU4-AU5 linked except 4-5; AU6-AU7
    for a, b in [(1, 2), (1, 4), (2, 4), (1, 5), (2, 5), (6, 7)]:
        assert linked(upper, a, b) and linked(flat, a, b)
    assert not linked(upper, 4, 5) and not linked(flat, 4, 5)
    for a, b in [(9, 10), (12, 14), (15, 17)]:
        assert linked(lower, a, b) and linked(flat, a, b)
    coordinated = {1: (12, 14, 15), 2: (12, 14, 15, 17), 4: (9, 10, 14, 15, 17), 5: (12,),
                   6: (9, 12, 14), 7: (9, 10, 12, 14, 15, 17)}
    for a, targets in coordinated.items():
        for b in PSYAU_AUS[6:]:
            assert linked(glob, a, b) == (b in targets), (a, b)
            assert linked(glob, b, a) == (b in targets), (b, a)
    # off-diagonal ones = 2 x undirected edges: 6 upper, 3 lower, 22 global
    off = [int((m.sum() - 12).item()) for m in (upper, lower, glob, flat)]
    assert off == [12, 6, 44, 62]


def test_scopes_stay_in_their_half():
    upper, lower, glob = (psych_adjacency(s) - torch.eye(12) for s in ("upper", "lower", "global"))
    assert upper[6:].sum() == 0 and upper[:, 6:].sum() == 0
    assert lower[:6].sum() == 0 and lower[:, :6].sum() == 0
    assert glob[:6, :6].sum() == 0 and glob[6:, 6:].sum() == 0
    torch.testing.assert_close(psych_adjacency("flat") - torch.eye(12), upper + lower + glob)
    with pytest.raises(ValueError, match="unknown scope"):
        psych_adjacency("middle")


def _aus(*rows):
    return np.stack([multi_hot(r) for r in rows])


def test_cooccurrence_counts_by_hand():
    au = _aus((1, 2), (1, 2, 4), (12,), (4, 99))  # AU99 is outside the node list
    c = cooccurrence_counts(au)
    assert c[IDX[1], IDX[2]] == 2 and c[IDX[2], IDX[1]] == 2
    assert c[IDX[1], IDX[1]] == 2 and c[IDX[4], IDX[4]] == 2 and c[IDX[1], IDX[4]] == 1
    assert c[IDX[12], IDX[12]] == 1 and c[IDX[12], IDX[1]] == 0
    assert c.sum() == 4 + 9 + 1 + 1
    # masked samples are left out, whatever their rows hold
    keep = np.array([True, True, True, False])
    masked = cooccurrence_counts(au, keep)
    assert masked[IDX[4], IDX[4]] == 1
    torch.testing.assert_close(masked, cooccurrence_counts(au[:3]))
    au_nan = au.copy()
    au_nan[3] = np.nan
    torch.testing.assert_close(cooccurrence_counts(au_nan, keep), masked)
    with pytest.raises(ValueError, match="multi-hot"):
        cooccurrence_counts(np.zeros((3, 5)))


def test_data_prior_rows_sum_to_one_or_zero():
    au = _aus((1, 2), (1, 2, 4), (12, 14), (6, 12))
    p = data_prior(cooccurrence_counts(au))
    sums = p.sum(1)
    seen = {1, 2, 4, 6, 12, 14}
    for au_id, i in IDX.items():
        expected = 1.0 if au_id in seen else 0.0
        assert sums[i].item() == pytest.approx(expected, abs=1e-6), au_id
    # row AU1: counts 1:2, 2:2, 4:1 -> 2/5, 2/5, 1/5
    assert p[IDX[1], IDX[2]].item() == pytest.approx(0.4)
    assert p[IDX[1], IDX[4]].item() == pytest.approx(0.2)
    assert torch.all(p[IDX[9]] == 0)


def test_data_prior_follows_the_training_aus():
    au = _aus((1, 2), (1, 2, 4), (12, 14))
    before = data_prior(cooccurrence_counts(au))
    au[2] = multi_hot((12, 15))
    after = data_prior(cooccurrence_counts(au))
    assert not torch.allclose(before, after)
    assert after[IDX[12], IDX[15]] > 0 and before[IDX[12], IDX[15]] == 0


def test_federated_sum_of_counts_equals_pooled_counts():
    rng = np.random.default_rng(0)
    au = (rng.random((30, 12)) < 0.3).astype(np.float32)
    clients = [au[:10], au[10:18], au[18:]]
    summed = sum(cooccurrence_counts(c) for c in clients)
    torch.testing.assert_close(summed, cooccurrence_counts(au))
    torch.testing.assert_close(data_prior(summed), data_prior(cooccurrence_counts(au)))
