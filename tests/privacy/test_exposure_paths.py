"""The exposure paths of the privacy review (issue 13), closed: each test reproduces one
finding on the primitives (the in-process loop: tests/federated/test_private_rounds.py;
Flower: tests/federated/test_flower.py)."""

import numpy as np
import pytest

from mer.privacy.encrypted import CKKSAggregation, CKKSParams
from mer.privacy.secagg import MaskedAggregation


def _model(rng):
    return [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(4)]


def _labs(k=3, seed=0):
    rng = np.random.default_rng(seed)
    return [f"lab{i}" for i in range(k)], [(_model(rng), int(rng.integers(5, 50)))
                                            for _ in range(k)]


SCHEMES = {"ckks": lambda: CKKSAggregation(CKKSParams(chunk_size=64)),
           "secagg": lambda: MaskedAggregation()}


# -- finding 2: one contributor, one lab's model --------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_sum_of_one_contributor_is_never_opened(scheme):
    """decode_sum over a single survivor would be that lab's own model: refused (for every
    scheme, with the min_clients rule), however the sum was formed."""
    ids, results = _labs()
    agg = SCHEMES[scheme]()
    agg.begin_round(1, ids, results[0][0])
    payloads = {c: agg.client_payload(c, w, n) for c, (w, n) in zip(ids, results)}
    total = agg.server_sum({"lab0": payloads["lab0"]})
    with pytest.raises(ValueError, match="min_clients"):
        agg.decode_sum(total, ["lab0"])


# -- finding 4: NaN passes the range check ---------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_primitives_refuse_non_finite_input(scheme, bad):
    """``np.abs(x).max() >= bound`` is False for NaN: the primitives check finiteness
    themselves, naming the client and the array."""
    ids, results = _labs()
    agg = SCHEMES[scheme]()
    agg.begin_round(1, ids, results[0][0])
    weights = [a.copy() for a in results[1][0]]
    weights[1][2] = bad
    with pytest.raises(ValueError, match=r"lab1.*non-finite.*array 1"):
        agg.client_payload("lab1", weights, results[1][1])


# -- finding 6: the server's key file is checked before it is loaded ------------------------


def test_a_context_files_role_is_read_from_its_framing(tmp_path, monkeypatch):
    """holds_secret_key() tells the two key files apart without TenSEAL loading either, and
    load_context() refuses the secret one for the server's role before deserialising it."""
    import tenseal

    from mer.privacy.encrypted import holds_secret_key, load_context, write_key_files

    secret, public = write_key_files(CKKSParams(), tmp_path)
    monkeypatch.setattr(tenseal, "context_from", lambda *a, **kw: pytest.fail("loaded"))
    assert holds_secret_key(secret) and not holds_secret_key(public)
    with pytest.raises(PermissionError, match="holds the secret key.*not loaded"):
        load_context(secret, private=False)
    junk = tmp_path / "junk.ctx"
    junk.write_bytes(b"\x0f" * 10)  # field 1, wire type 7: no protobuf
    with pytest.raises(ValueError, match="not a TenSEAL context file"):
        holds_secret_key(junk)
