"""Threshold secure aggregation (mer.privacy.secagg, Shamir shares in mer.privacy.shamir):
labs dropping at every step, the threshold refusals, the honest lab's refusals, and a curious
server that keeps everything: it never holds both secrets of a lab, and what it rebuilds of a
dropped or late lab is no better than a guess from the sum."""

import random

import numpy as np
import pytest

from mer.privacy import shamir
from mer.privacy.base import TooFewContributors
from mer.privacy.secagg import (
    MaskParams,
    SecAggParty,
    SecAggServer,
    curious_estimate,
    decode_fixed,
    encode_fixed,
)

FRAC = 24


# -- Shamir -----------------------------------------------------------------------------------


def test_any_t_shares_rebuild_the_secret_and_fewer_refuse():
    secret = bytes(range(32))
    shares = shamir.split(secret, n=5, t=3)
    for subset in ([1, 2, 3], [5, 3, 1], [2, 4, 5], [1, 2, 3, 4, 5]):
        assert shamir.combine({x: shares[x] for x in subset}, t=3) == secret
    with pytest.raises(ValueError, match="undetermined"):
        shamir.combine({1: shares[1], 4: shares[4]}, t=3)
    assert shamir.share_value(shamir.share_bytes(shares[2])) == shares[2]
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(secret, n=2, t=3)


def test_shamir_known_answer():
    """f(x) = 7 + 3x + 2x^2 mod 13: shares (1, 12), (2, 8), (3, 8); any two of them alone fit
    a line through any secret, all three give back 7."""
    coeffs = iter([3, 2])
    shares = shamir.split(bytes([7]), n=3, t=3, prime=13, randbelow=lambda p: next(coeffs))
    assert shares == {1: 12, 2: 8, 3: 8}
    assert shamir.combine(shares, t=3, length=1, prime=13) == bytes([7])


def test_fewer_than_t_shares_are_uniform_whatever_the_secret():
    """t = 2 over GF(13): the distribution of one share is the same (uniform) for secret 0
    and secret 9 (chi-square over 13 000 draws each)."""
    from scipy.stats import chisquare

    rng = random.Random(0)
    counts = {}
    for secret in (0, 9):
        c = np.zeros(13)
        for _ in range(13_000):
            c[shamir.split(bytes([secret]), n=3, t=2, prime=13, randbelow=rng.randrange)[1]] += 1
        counts[secret] = c
        assert chisquare(c).pvalue > 1e-4
    assert chisquare(counts[0], counts[9] * counts[0].sum() / counts[9].sum()).pvalue > 1e-4


# -- the protocol, step by step ------------------------------------------------------------


def _inputs(k: int, d: int = 300, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"lab{i}": rng.standard_normal(d) * 10 for i in range(k)}


class Round:
    """One round of the protocol in process; ``drop``: step -> labs lost at that step
    (``keys``: before advertising, ``shares``: after advertising, ``masked``: after sharing,
    ``unmask``: after sending the masked input, ``answer``: they answer no unmasking)."""

    def __init__(self, xs: dict[str, np.ndarray], params: MaskParams, drop: dict | None = None,
                 rnd: int = 7):
        self.xs, self.params, self.drop = xs, params, drop or {}
        ids = list(xs)
        self.server = SecAggServer(rnd, ids, params)
        self.parties = {c: SecAggParty(c, rnd, params) for c in ids}
        self.u = {}

    def alive(self, step: str, group: list[str]) -> list[str]:
        gone = {c for s in ("keys", "shares", "masked", "unmask", "answer")[
            :("keys", "shares", "masked", "unmask", "answer").index(step) + 1]
            for c in self.drop.get(s, [])}
        return [c for c in group if c not in gone]

    def run(self, late: str | None = None) -> tuple[np.ndarray, float]:
        s, p = self.server, self.parties
        roster = s.receive_keys({c: p[c].advertise() for c in self.alive("keys", list(p))})
        relayed = s.receive_shares({c: p[c].share_keys(roster)
                                    for c in self.alive("shares", list(roster))})
        for c in s.u2:
            p[c].receive_shares(relayed[c], s.u2)
        masked = {c: p[c].mask(encode_fixed(self.xs[c], FRAC, 64))
                  for c in self.alive("masked", s.u2)}
        on_time = {c: y for c, y in masked.items() if c != late}
        total = s.receive_masked(on_time)
        if late:  # arrives after the collection closed: a curious server keeps it
            s.receive_late(late, masked[late])
        survivors, dropped = s.unmask_request()
        answers = {c: p[c].unmask(survivors, dropped) for c in self.alive("answer", survivors)}
        return s.unmask(answers, total)

    def expected(self) -> np.ndarray:
        return sum(self.xs[c] for c in self.server.u3)


STEPS = ["keys", "shares", "masked", "unmask", "answer"]


@pytest.mark.parametrize("step", STEPS)
def test_a_lab_dropping_at_any_step_leaves_the_sum_of_those_whose_input_arrived(step):
    xs = _inputs(5)
    r = Round(xs, MaskParams(min_clients=3), {step: ["lab1"]})
    flat, count = r.run()
    counted = [c for c in xs if c != "lab1" or step in ("unmask", "answer")]
    assert r.server.u3 == counted  # a lab whose masked input arrived is in the sum
    np.testing.assert_allclose(np.append(flat, count), r.expected(), rtol=0, atol=1e-5)


def test_labs_dropping_at_every_step_of_one_round():
    """8 labs, t = 3: one lost before the key exchange, one after it, one after sharing, one
    after its masked input, one during the unmasking: the sum of the five inputs that
    arrived."""
    xs = _inputs(8, seed=1)
    drop = {"keys": ["lab0"], "shares": ["lab2"], "masked": ["lab4"], "unmask": ["lab5"],
            "answer": ["lab6"]}
    r = Round(xs, MaskParams(min_clients=3, threshold=3), drop)
    flat, count = r.run()
    assert r.server.u3 == ["lab1", "lab3", "lab5", "lab6", "lab7"]
    np.testing.assert_allclose(np.append(flat, count), r.expected(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("step,left", [("keys", 2), ("shares", 2), ("masked", 2),
                                       ("answer", 2)])
def test_below_the_threshold_the_round_is_refused_not_opened(step, left):
    """5 labs, t = 3 (= min_clients): with only 2 left at some step nothing is unmasked."""
    xs = _inputs(5, seed=2)
    r = Round(xs, MaskParams(min_clients=3), {step: ["lab0", "lab1", "lab2"][: 5 - left]})
    with pytest.raises(TooFewContributors, match="skipped"):
        r.run()
    assert not r.server.held["shares"]["b"] or step == "answer"


def test_default_threshold_is_a_majority_and_at_least_min_clients():
    from mer.privacy.secagg import threshold_for

    assert [threshold_for(n, MaskParams()) for n in (3, 4, 5, 8, 9)] == [3, 3, 3, 5, 5]
    assert threshold_for(10, MaskParams(threshold=4)) == 4


def test_an_honest_lab_never_reveals_both_secrets_of_one_lab():
    xs = _inputs(4, seed=3)
    r = Round(xs, MaskParams(min_clients=3))
    s, p = r.server, r.parties
    roster = s.receive_keys({c: p[c].advertise() for c in p})
    relayed = s.receive_shares({c: p[c].share_keys(roster) for c in p})
    for c in p:
        p[c].receive_shares(relayed[c], s.u2)
    for c in p:
        p[c].mask(encode_fixed(xs[c], FRAC, 64))
    ids = list(p)
    with pytest.raises(PermissionError, match="both survivor and dropped"):
        p["lab0"].unmask(ids, ["lab3"])
    with pytest.raises(PermissionError, match="as dropped"):
        p["lab0"].unmask(ids[1:], ["lab0"])
    p["lab0"].unmask(ids, [])  # honest request: every self mask
    with pytest.raises(PermissionError, match="already revealed"):  # lab3 "dropped" after all
        p["lab0"].unmask(ids[:3], ["lab3"])
    with pytest.raises(TooFewContributors):  # too few survivors to hide anyone
        p["lab1"].unmask(ids[:2], ids[2:])
    fresh = SecAggParty("lab9", 7, MaskParams())
    with pytest.raises(PermissionError, match="no masked input"):
        fresh.unmask(ids, [])


def test_tampered_or_misrouted_shares_do_not_decrypt():
    xs = _inputs(3, seed=4)
    r = Round(xs, MaskParams(min_clients=3))
    s, p = r.server, r.parties
    roster = s.receive_keys({c: p[c].advertise() for c in p})
    relayed = s.receive_shares({c: p[c].share_keys(roster) for c in p})
    bad = dict(relayed["lab0"])
    bad["lab1"] = bad["lab1"][:-1] + bytes([bad["lab1"][-1] ^ 1])
    with pytest.raises(ValueError, match="'lab1' do not decrypt"):
        p["lab0"].receive_shares(bad, s.u2)
    with pytest.raises(ValueError, match="do not decrypt"):  # lab2's shares, sent to lab0
        p["lab0"].receive_shares({"lab1": relayed["lab2"]["lab1"],
                                  "lab2": relayed["lab0"]["lab2"]}, s.u2)


# -- the curious server ----------------------------------------------------------------------


def _error(estimate: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((estimate - truth) ** 2)))


def _guess_error(r: Round, target: str) -> float:
    """Error of the best guess of the target's input from the released sum alone: the mean
    of the summed labs (the target's own input being unknown)."""
    guess = r.expected() / max(len(r.server.u3), 1)
    return _error(guess, r.xs[target])


@pytest.mark.parametrize("scenario", ["dropped after sharing", "late", "counted",
                                      "dropped during unmasking"])
def test_the_server_learns_nothing_of_one_lab_beyond_the_sum(scenario):
    """From everything the server holds (public keys, ciphertexts, masked inputs, the shares
    of the unmasking), its reconstruction of one lab's input is no better than a guess from
    the sum: uncorrelated with the input and at least as far from it. The control: the same
    attacker, also handed the shares an honest lab refuses to give, recovers it exactly."""
    xs = _inputs(6, seed=5)
    target = "lab2"
    drop = {"masked": [target]} if scenario == "dropped after sharing" else \
        {"answer": [target]} if scenario == "dropped during unmasking" else {}
    r = Round(xs, MaskParams(min_clients=3), drop)
    r.run(late=target if scenario == "late" else None)
    held, t = r.server.held, r.server.t
    for owner in r.parties:  # never t shares of both secrets of one lab
        assert min(len(held["shares"]["b"].get(owner, {})),
                   len(held["shares"]["s"].get(owner, {}))) < t, owner
    estimate = curious_estimate(r.server, target)
    truth = np.asarray(xs[target])
    if scenario == "dropped after sharing":
        assert estimate is None  # nothing of it ever reached the server
        return
    estimate = estimate[:len(truth)]
    assert abs(np.corrcoef(estimate, truth)[0, 1]) < 0.2
    assert _error(estimate, truth) >= _guess_error(r, target)
    # control: an attacker given the refused shares too would succeed
    index = {c: i for i, c in enumerate(r.server.roster, start=1)}
    kind = "s" if target in r.server.u3 else "b"
    held["shares"][kind][target] = {index[c]: r.parties[c].shares[target][kind == "s"]
                                    for c in r.server.u3[:t]}
    np.testing.assert_allclose(curious_estimate(r.server, target)[:len(truth)], truth,
                               rtol=0, atol=1e-6)


def test_masked_inputs_decode_to_noise_alone():
    xs = _inputs(3, seed=6)
    r = Round(xs, MaskParams(min_clients=3))
    r.run()
    for c, y in r.server.held["masked"].items():
        v = decode_fixed(np.frombuffer(y, "<u8"), FRAC, 64)
        assert abs(np.corrcoef(v, xs[c])[0, 1]) < 0.2 and np.abs(v).max() > 1e9


def test_a_party_survives_its_storage_between_messages():
    """to_state / from_state keep every secret and step of the party (Flower keeps it in the
    SuperNode's context.state between messages), including what it already revealed."""
    xs = _inputs(4, seed=7)
    params = MaskParams(min_clients=3)
    r = Round(xs, params)
    r.run()
    for c, party in r.parties.items():
        back = SecAggParty.from_state(party.to_state(), params)
        assert back.to_state() == party.to_state() and back.advertise() == party.advertise()
        other = next(x for x in xs if x != c)  # its self-mask share went out: not its key now
        with pytest.raises(PermissionError, match="already revealed"):
            back.unmask([x for x in xs if x != other], [other])
