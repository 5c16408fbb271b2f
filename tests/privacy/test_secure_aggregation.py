"""Secure aggregation (CKKS and pairwise masks): sums equal plaintext FedAvg / P-FedProx, the
server never holds an individual plaintext update, and dropouts after masking are recovered."""

import numpy as np
import pytest

from mer.federated import aggregators
from mer.privacy.base import Layout, flatten, mean_from_sum, personalise_from_sum
from mer.privacy.encrypted import CKKSAggregation, CKKSParams, decrypt
from mer.privacy.secagg import MaskedAggregation, MaskParams, decode_fixed, encode_fixed


def model(rng, scale=1.0):
    """A small state dict: conv weight, bias, BN buffers with an integer counter."""
    return [(rng.standard_normal((4, 3, 3, 3)) * scale).astype(np.float32),
            rng.standard_normal(4).astype(np.float32),
            rng.random(4).astype(np.float32),
            np.array(rng.integers(0, 500), dtype=np.int64)]


def clients(k=4, seed=0):
    rng = np.random.default_rng(seed)
    return [f"lab{i}" for i in range(k)], [(model(rng), int(rng.integers(5, 200)))
                                            for _ in range(k)]


SCHEMES = {
    "ckks": lambda: CKKSAggregation(CKKSParams(chunk_size=64)),  # several chunks per model
    "secagg": lambda: MaskedAggregation(),
}


def run_round(agg, ids, results, deliver=None):
    agg.begin_round(3, ids, results[0][0])
    payloads = {c: agg.client_payload(c, w, n) for c, (w, n) in zip(ids, results)}
    delivered = {c: payloads[c] for c in (deliver or ids)}
    return payloads, agg.server_sum(delivered)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_secure_mean_equals_plaintext_fedavg(scheme):
    ids, results = clients()
    agg = SCHEMES[scheme]()
    _, total = run_round(agg, ids, results)
    mean = agg.finish(total, ids)
    expected = aggregators.fedavg(results)
    err = max(np.abs(np.asarray(a, np.float64) - b).max() for a, b in zip(mean, expected))
    assert err < 1e-6, err  # CKKS ~1e-9, masks' fixed point 2^-24 / N
    assert [a.dtype for a in mean] == [a.dtype for a in expected]
    assert mean[3] == expected[3]  # the integer counter, rounded as FedAvg does


@pytest.mark.parametrize("scheme", SCHEMES)
def test_pfedprox_from_the_decrypted_sum(scheme):
    ids, results = clients(k=3, seed=1)
    agg = SCHEMES[scheme]()
    _, total = run_round(agg, ids, results)
    s, count = agg.decode_sum(total, ids)
    assert round(count) == sum(n for _, n in results)
    expected = aggregators.pfedprox_personalise([w for w, _ in results],
                                                [n for _, n in results], own=0.9)
    layout = Layout.of(results[0][0])
    for (w, n), exp in zip(results, expected):
        mine = personalise_from_sum(w, n, s, count, layout, own=0.9)
        assert np.abs(flatten(mine)[:-1] - flatten(exp)[:-1]).max() < 1e-5


@pytest.mark.parametrize("scheme", SCHEMES)
def test_server_never_sees_an_individual_plaintext(scheme):
    ids, results = clients(k=3, seed=2)
    agg = SCHEMES[scheme]()
    seen = []
    server_sum = agg.server_sum
    agg.server_sum = lambda payloads: seen.append(dict(payloads)) or server_sum(payloads)
    _, total = run_round(agg, ids, results)
    assert seen and all(isinstance(p, bytes) for p in seen[0].values())
    for (w, n), payload in zip(results, seen[0].values()):
        plain = flatten(w)
        for dtype in ("<f4", "<f8"):  # the update's raw bytes appear nowhere in the payload
            assert np.asarray(plain[:8], dtype).tobytes() not in payload
        as_ints = np.frombuffer(payload[: len(payload) // 8 * 8], "<u8")
        for frac in (24, 40):  # nor does it read as a fixed-point copy of n * w
            guess = decode_fixed(as_ints[: len(plain)], frac, 64)
            if len(guess) == len(plain):
                assert not np.allclose(guess, n * plain, atol=1e-3)
                assert abs(np.corrcoef(guess, plain)[0, 1]) < 0.3
    assert isinstance(total, bytes)
    if scheme == "ckks":  # the server's context cannot decrypt: it has no secret key
        assert agg.server_context.is_private() is False
        assert agg.client_context.is_private() is True
        with pytest.raises(PermissionError):
            decrypt(agg.server_context, total)
        with pytest.raises(ValueError):
            agg.server_context.secret_key()


def _byte_uniformity_p(words: np.ndarray) -> float:
    """Smallest chi-square p-value, over the 8 byte positions of uint64 words, of the
    hypothesis that the bytes at that position are uniform on 0..255."""
    from scipy.stats import chisquare

    as_bytes = words.astype("<u8").view(np.uint8).reshape(-1, 8)
    return min(chisquare(np.bincount(as_bytes[:, k], minlength=256)).pvalue for k in range(8))


def test_masked_vector_alone_looks_uniform():
    """Each byte position of a lone masked vector passes a chi-square test of uniformity;
    the same vector unmasked (fixed point of ``n * w``, high bytes all 0x00 or 0xff) fails it."""
    from mer.privacy.base import weighted_vector

    rng = np.random.default_rng(3)
    ids = ["lab0", "lab1", "lab2"]
    results = [([rng.standard_normal(8191).astype(np.float32)], int(rng.integers(5, 200)))
               for _ in ids]  # 8192 words with the count: 32 per byte value and position
    agg = MaskedAggregation()
    payloads, _ = run_round(agg, ids, results)
    plain = encode_fixed(weighted_vector(*results[0]), agg.params.frac_bits, 64)
    assert _byte_uniformity_p(plain) < 1e-12  # the check can tell plaintext apart
    for c in ids:  # Bonferroni over 3 clients x 8 positions: a false alarm < 1e-6 per run
        masked = np.frombuffer(payloads[c], "<u8")
        assert len(masked) == len(plain)
        assert _byte_uniformity_p(masked) > 1e-6 / 24, c


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dropout_after_masking_leaves_the_survivors_sum(scheme):
    ids, results = clients(k=5, seed=4)
    agg = SCHEMES[scheme]()
    survivors = ["lab0", "lab2", "lab3"]  # lab1 and lab4 masked, then dropped
    _, total = run_round(agg, ids, results, deliver=survivors)
    mean = agg.finish(total, survivors)
    expected = aggregators.fedavg([results[ids.index(c)] for c in survivors])
    assert max(np.abs(np.asarray(a, np.float64) - b).max()
               for a, b in zip(mean, expected)) < 1e-6


def test_dropout_without_recovery_gives_garbage():
    ids, results = clients(k=4, seed=5)
    agg = MaskedAggregation()
    _, total = run_round(agg, ids, results, deliver=ids[:3])
    raw = decode_fixed(np.frombuffer(total, "<u8"), 24, 64)  # the sum, unmasked by nobody
    assert np.abs(raw).max() > 1e6


def test_secagg_refusals():
    from mer.privacy.base import TooFewContributors

    ids, results = clients(k=3, seed=6)
    agg = MaskedAggregation(MaskParams(min_clients=2))
    _, total = run_round(agg, ids, results, deliver=["lab0"])
    with pytest.raises(TooFewContributors, match="min_clients=2"):
        agg.finish(total, ["lab0"])
    for bad in ({"min_clients": 1}, {"threshold": 1}, {"mask_bits": 65}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MaskParams(**bad)
    small = MaskedAggregation(MaskParams(mask_bits=32, frac_bits=24))
    small.begin_round(0, ids, results[0][0])
    with pytest.raises(OverflowError, match="frac_bits"):
        small.client_payload("lab0", results[0][0], 1000)
    with pytest.raises(ValueError, match="not selected"):
        agg.client_payload("stranger", results[0][0], 3)


@pytest.mark.parametrize("bits", [32, 64])
def test_fixed_point_round_trip(bits):
    x = np.array([-3.25, 0.0, 1e-3, 1234.5])
    assert np.allclose(decode_fixed(encode_fixed(x, 16, bits), 16, bits), x, atol=2**-16)


def test_every_privacy_config_builds():
    from pathlib import Path

    from omegaconf import OmegaConf

    from mer.privacy import from_config
    from mer.privacy.dp import CentralDPConfig, DPConfig

    conf = Path(__file__).resolve().parents[2] / "conf" / "privacy"
    built = {p.stem: from_config(OmegaConf.load(p)) for p in sorted(conf.glob("*.yaml"))}
    assert built["none"] is None
    assert isinstance(built["ckks"], CKKSAggregation)
    assert built["ckks"].params.poly_modulus_degree == 8192
    assert isinstance(built["secagg"], MaskedAggregation)
    assert isinstance(built["dp"], DPConfig) and isinstance(built["central_dp"], CentralDPConfig)


def test_ckks_refuses_values_beyond_its_range():
    ids, results = clients(k=3, seed=7)
    agg = CKKSAggregation(CKKSParams(coeff_mod_bit_sizes=[60, 60], scale_bits=40))
    agg.begin_round(0, ids, results[0][0])
    big = [a * 1e4 if a.dtype.kind == "f" else a for a in results[0][0]]
    with pytest.raises(OverflowError, match="data prime"):
        agg.client_payload("lab0", big, 100)


def test_ckks_key_files_give_each_party_only_its_role(tmp_path, capsys):
    """``python -m mer.privacy.keys``: labs encrypt and decrypt with the secret file, the
    server (public file alone) only adds, and each file refuses the other role."""
    from mer.privacy import keys
    from mer.privacy.encrypted import PUBLIC_FILE, SECRET_FILE, load_context

    keys.main(["--out", str(tmp_path)])
    secret, public = tmp_path / SECRET_FILE, tmp_path / PUBLIC_FILE
    assert f"privacy.public_context={public}" in capsys.readouterr().out
    assert secret.stat().st_mode & 0o077 == 0  # the owner's only
    ids, results = clients(k=3, seed=7)
    lab = CKKSAggregation(CKKSParams(secret_context=str(secret)))
    server = CKKSAggregation(CKKSParams(public_context=str(public)))
    assert server.client_context is None and not server.server_context.is_private()
    for party in (lab, server):
        party.begin_round(1, ids, results[0][0])
    payloads = {c: lab.client_payload(c, w, n) for c, (w, n) in zip(ids, results)}
    mean = lab.finish(server.server_sum(payloads), ids)
    for a, b in zip(mean, aggregators.fedavg(results)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    with pytest.raises(PermissionError, match="holds no secret key"):
        server.client_payload(ids[0], *results[0])
    with pytest.raises(PermissionError, match="holds no secret key"):
        server.finish(server.server_sum(payloads), ids)
    with pytest.raises(PermissionError, match="holds the secret key"):
        load_context(secret, private=False)
    with pytest.raises(ValueError, match="holds no secret key"):
        load_context(public, private=True)
    with pytest.raises(FileNotFoundError, match="python -m mer.privacy.keys"):
        load_context(tmp_path / "missing.ctx", private=True)
    # another federation's key: its payloads do not decrypt to this sum
    other = CKKSAggregation(CKKSParams())
    other.begin_round(1, ids, results[0][0])
    wrong, _ = lab.decode_sum(other.server_sum(
        {c: other.client_payload(c, w, n) for c, (w, n) in zip(ids, results)}), ids)
    right, _ = lab.decode_sum(server.server_sum(payloads), ids)
    assert not np.allclose(wrong, right, atol=1e-3)


def test_secagg_parties_kept_as_bytes_between_messages():
    """The Flower split of secagg: each lab's party lives only as its own stored bytes
    between two steps (``to_state`` / ``from_state``), the server holds none; a lab lost after
    sharing its keys is recovered from the survivors' shares of its key."""
    from mer.privacy.secagg import SecAggParty, SecAggServer

    ids, results = clients(k=4, seed=8)
    template = results[0][0]
    params = MaskParams(min_clients=3)
    stored = {c: SecAggParty(c, 5, params).to_state() for c in ids}

    def step(c, method, *args):
        party = SecAggParty.from_state(stored[c], params)
        out = getattr(party, method)(*args)
        stored[c] = party.to_state()
        return out

    server = SecAggServer(5, ids, params)
    roster = server.receive_keys({c: step(c, "advertise") for c in ids})
    relayed = server.receive_shares({c: step(c, "share_keys", roster) for c in ids})
    for c in ids:
        step(c, "receive_shares", relayed[c], server.u2)
    lost = ids[0]  # shared its keys, then never sent its masked input
    lab = MaskedAggregation(params)
    lab.begin_round(5, ids, template)  # (only its encode() is used: the fixed-point checks)
    payloads = {c: step(c, "mask", lab.encode(c, w, n, len(ids)))
                for c, (w, n) in zip(ids, results) if c != lost}
    server.receive_masked(payloads)
    survivors, dropped = server.unmask_request()
    assert dropped == [lost]
    flat, count = server.unmask({c: step(c, "unmask", survivors, dropped) for c in survivors})
    for a, b in zip(mean_from_sum(flat, count, Layout.of(template), "test"),
                    aggregators.fedavg(results[1:])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    with pytest.raises(PermissionError, match="already revealed"):  # asked again, flipped
        step(survivors[0], "unmask", [c for c in survivors if c != survivors[1]] + [lost],
             [survivors[1]])
