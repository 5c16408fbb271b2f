"""Dropout-robust secure aggregation with a threshold (SecAgg, Bonawitz et al., CCS 2017).

The server learns the sum of the labs' vectors ``x_u = [n_u * w_u, n_u]`` (D + 1 values,
:mod:`mer.privacy.base`) and nothing else about any one lab, even when labs drop out at any
step, as long as at least ``t`` labs take part in every step.

One round, for the selected labs (in the round's order). ``t`` is the threshold,
:func:`threshold_for`; ``U1 >= U2 >= U3`` are the labs still there after each step:

0. **Advertise keys.** Lab u makes two fresh X25519 key pairs: ``c_u`` (to encrypt the shares
   it sends) and ``s_u`` (for its pairwise masks); the server collects the public halves of
   ``U1`` and relays them to all.
1. **Share keys.** Lab u draws a 32-byte self-mask seed ``b_u`` and splits both ``b_u`` and
   its pairwise secret key ``s_u^SK`` t-of-|U1| (:mod:`mer.privacy.shamir`, share ``i`` for
   the i-th lab of U1). Each lab v's pair of shares goes to the server encrypted under
   AES-256-GCM with ``HKDF(X25519(c_u^SK, c_v^PK), round, u, v)`` (and the round, sender and
   receiver as associated data): the server relays them but cannot read them. ``U2``: the labs
   whose shares arrived.
2. **Masked input.** Lab u (in U2) quantises ``x_u`` to fixed point mod 2^k and sends
   ``y_u = x_u + PRG(b_u) + sum_{v in U2, v after u} PRG(s_uv) - sum_{v before u} PRG(s_uv)``
   with ``s_uv = HKDF(X25519(s_u^SK, s_v^PK), round, u, v)`` (v's public key: the same seed)
   and PRG = AES-256-CTR. ``U3``: the labs whose masked input arrived. Every one of them is in
   the sum, however late (the server has no other use for a masked input).
3. **Unmasking.** The server tells each lab of U3 who survived (U3) and who dropped
   (``U2 - U3``), and asks, for every other lab v, *either* the share of ``b_v`` (v in U3)
   *or* the share of ``s_v^SK`` (v dropped), never both. An honest lab refuses a request that
   names a lab on both sides, that would reveal the other kind of share for a lab it already
   answered for, or that leaves fewer than ``max(t, min_clients)`` survivors. With ``t``
   answers the server rebuilds ``b_v`` of each survivor (removing its self mask) and
   ``s_v^SK`` of each dropped lab (rebuilding, from the survivors' public keys, the pairwise
   masks that no longer cancel), and decodes the sum.

Threats covered (tested in ``tests/privacy/test_threshold_secagg.py``):

- **an honest-but-curious server**, which follows the protocol but keeps everything it sees:
  public keys, share ciphertexts it cannot open, masked vectors (each uniform mod 2^k on its
  own), and shares of ``b_v`` for survivors and of ``s_v^SK`` for dropped labs only. It never
  holds ``t`` shares of both secrets of one lab, so it learns the sum of U3 and nothing more;
- **up to t - 1 colluding labs** (with the server or not): t - 1 shares of a secret are
  uniformly distributed, so the coalition learns nothing beyond its own inputs and the sum;
- **dropouts at any step**: before the key exchange (not in U1), after it (no shares: not in
  U2), after sending shares (pairwise masks removed with its reconstructed ``s_v^SK``; its
  input never sent), after sending its masked input (it is counted in the sum; its self mask
  is removed with the survivors' shares of ``b_v``), during the unmasking (any ``t``
  answers suffice). A lab that drops after its masked input arrived is never unmasked:
  the server would need ``b_v``, and honest labs hand out ``b_v`` shares only for labs in
  the sum. A round with fewer than ``max(t, min_clients)`` labs at any step is skipped
  (:class:`~mer.privacy.base.TooFewContributors`): no aggregate is released.

Not covered: a malicious server that lies about who dropped to different labs (Bonawitz et
al.'s consistency round with signatures, not built here; the default ``t > |U1| / 2`` keeps
two disjoint groups of answers from both reaching ``t``), and labs that send wrong values
(secure aggregation hides inputs, it does not check them). Precision: quantisation error
``2^-(frac_bits + 1)`` per value and lab (3e-8 at 24 bits), before dividing by N.

Roles and code paths: :class:`SecAggParty` is one lab's side of one round,
:class:`SecAggServer` the server's; both are plain objects with one method per step. The
in-process run (:class:`MaskedAggregation`, the :class:`~mer.privacy.base.SecureAggregation`
interface of the federated loop) drives every lab's party and the server in one process; over
Flower (:mod:`mer.federated.flower_app`) each SuperNode keeps its own party between messages
(:meth:`SecAggParty.to_state`) and the ServerApp holds the server object.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mer.privacy import shamir
from mer.privacy.base import (
    SecureAggregation,
    TooFewContributors,
    Weights,
    check_finite,
    weighted_vector,
)


@dataclass
class MaskParams:
    """Secure aggregation parameters (``conf/privacy/secagg.yaml``).

    Attributes:
        mask_bits: arithmetic mod 2^mask_bits (8..64).
        frac_bits: fixed-point fraction bits; ``|sum n_k w_k| * 2^frac_bits`` must stay below
            ``2^(mask_bits - 1)`` (checked on each lab with the round's lab count).
        min_clients: the fewest labs whose sum may be released; a round with fewer is skipped.
        threshold: t of the t-of-n sharing; None: ``max(min_clients, n // 2 + 1)`` for the n
            labs that advertised keys (:func:`threshold_for`).
        disclose_per_lab: each lab also sends its own test confusion matrix in plaintext
            (per-lab results at the server): an opt-in disclosure, off by default.
    """

    mask_bits: int = 64
    frac_bits: int = 24
    min_clients: int = 3
    threshold: int | None = None
    disclose_per_lab: bool = False

    def __post_init__(self) -> None:
        if not 8 <= int(self.mask_bits) <= 64:
            raise ValueError(f"secagg: privacy.mask_bits must be in [8, 64], got "
                             f"{self.mask_bits}")
        if int(self.min_clients) < 2:
            raise ValueError(f"secagg: privacy.min_clients must be >= 2 (a sum of one lab is "
                             f"its update), got {self.min_clients}")
        if self.threshold is not None and int(self.threshold) < 2:
            raise ValueError(f"secagg: privacy.threshold must be >= 2 (one share would be the "
                             f"secret), got {self.threshold}; null for the default")


def threshold_for(n: int, params: MaskParams) -> int:
    """The threshold t for a round whose key exchange ``n`` labs joined."""
    if params.threshold is not None:
        return int(params.threshold)
    return max(int(params.min_clients), n // 2 + 1)


def prg(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` pseudo-random integers mod 2^bits (uint64) from a 32-byte seed (AES-CTR)."""
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(
        bytes(8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64) & _modmask(bits)


def _modmask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


def encode_fixed(x: np.ndarray, frac_bits: int, bits: int) -> np.ndarray:
    """Float vector -> integers mod 2^bits (two's complement fixed point), uint64."""
    q = np.rint(x * 2.0**frac_bits).astype(np.int64)
    return q.view(np.uint64) & _modmask(bits)


def decode_fixed(v: np.ndarray, frac_bits: int, bits: int) -> np.ndarray:
    """Integers mod 2^bits -> signed float64 vector (inverse of :func:`encode_fixed`)."""
    v = np.asarray(v, np.uint64) & _modmask(bits)
    signed = v.astype(np.int64) if bits == 64 else v.astype(np.int64) - (
        (v >= np.uint64(1 << (bits - 1))).astype(np.int64) << bits)
    return signed.astype(np.float64) / 2.0**frac_bits


def _raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def _agree(private: bytes, public: bytes, label: str, rnd: int, u: str, v: str) -> bytes:
    """32 bytes both ends of the pair (u, v) derive: HKDF(X25519(private, public))."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public))
    a, b = sorted((u, v))
    info = f"mer-secagg|{label}|round {rnd}|{a}|{b}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def pair_seed(private: bytes, public: bytes, rnd: int, u: str, v: str) -> bytes:
    """The pairwise mask seed ``s_uv`` of labs u and v (u's secret key, v's public key)."""
    return _agree(private, public, "mask", rnd, u, v)


def _share_aad(rnd: int, sender: str, receiver: str) -> bytes:
    return f"mer-secagg-shares|round {rnd}|from {sender}|to {receiver}".encode()


Roster = dict[str, tuple[bytes, bytes]]  # lab -> (c_pk, s_pk), in the round's order


class SecAggParty:
    """One lab's side of one round (its secrets stay here; see the module notes).

    Steps, in order: :meth:`advertise`, :meth:`share_keys`, :meth:`receive_shares`,
    :meth:`mask`, :meth:`unmask`. Over Flower the party is stored between messages with
    :meth:`to_state` / :meth:`from_state` (in the SuperNode's own state only).
    """

    def __init__(self, client_id: str, rnd: int, params: MaskParams) -> None:
        self.client_id, self.rnd, self.params = str(client_id), int(rnd), params
        self._c = _raw(X25519PrivateKey.generate())
        self._s = _raw(X25519PrivateKey.generate())
        self._b: bytes | None = None
        self.t = 0
        self.roster: Roster = {}
        self.u2: list[str] = []
        self.shares: dict[str, tuple[int, int]] = {}  # owner -> (its b share, its s share)
        self.masked = False
        self.revealed: dict[str, set[str]] = {"b": set(), "s": set()}

    def _who(self) -> str:
        return f"secagg: lab {self.client_id!r} (round {self.rnd})"

    # -- step 0 ---------------------------------------------------------------------------------

    def advertise(self) -> tuple[bytes, bytes]:
        """The public keys ``(c_u^PK, s_u^PK)`` this lab publishes through the server."""
        return (_public(X25519PrivateKey.from_private_bytes(self._c)),
                _public(X25519PrivateKey.from_private_bytes(self._s)))

    # -- step 1 ---------------------------------------------------------------------------------

    def share_keys(self, roster: Mapping[str, tuple[bytes, bytes]]) -> dict[str, bytes]:
        """Draw ``b_u``, share ``b_u`` and ``s_u^SK`` t-of-|U1| among the ``roster`` (U1: lab
        -> public keys, in the round's order) and encrypt each lab's pair of shares for it.
        Returns ``{lab v: ciphertext}`` for every other lab of U1."""
        roster = {str(k): (bytes(c), bytes(s)) for k, (c, s) in roster.items()}
        if self.advertise() != roster.get(self.client_id):
            raise ValueError(f"{self._who()}: the roster the server relayed does not hold this "
                             "lab's own public keys; a stale or foreign roster?")
        self.t = threshold_for(len(roster), self.params)
        if len(roster) < max(self.t, self.params.min_clients):
            raise TooFewContributors(
                f"{self._who()}: {len(roster)} lab(s) in the key exchange < threshold t="
                f"{self.t} / min_clients={self.params.min_clients}: refusing to share keys")
        self.roster = roster
        self._b = os.urandom(32)
        b_shares = shamir.split(self._b, len(roster), self.t)
        s_shares = shamir.split(self._s, len(roster), self.t)
        out = {}
        for i, (v, (c_pk, _)) in enumerate(roster.items(), start=1):
            if v == self.client_id:
                self.shares[v] = (b_shares[i], s_shares[i])
                continue
            key = _agree(self._c, c_pk, "shares", self.rnd, self.client_id, v)
            nonce = os.urandom(12)
            plain = shamir.share_bytes(b_shares[i]) + shamir.share_bytes(s_shares[i])
            out[v] = nonce + AESGCM(key).encrypt(nonce, plain,
                                                 _share_aad(self.rnd, self.client_id, v))
        return out

    # -- step 2 ---------------------------------------------------------------------------------

    def receive_shares(self, ciphertexts: Mapping[str, bytes], u2: Sequence[str]) -> None:
        """Decrypt the shares the other labs of ``u2`` (those whose shares reached the
        server) sent this lab; ``ciphertexts``: sender -> ciphertext, as the server relayed."""
        u2 = [str(c) for c in u2]
        if not self.roster:
            raise RuntimeError(f"{self._who()}: share_keys() comes before receive_shares()")
        strangers = [c for c in u2 if c not in self.roster]
        if strangers or self.client_id not in u2:
            raise ValueError(f"{self._who()}: the round's lab list {u2} names labs outside the "
                             f"key exchange ({strangers}) or leaves this lab out")
        if len(u2) < max(self.t, self.params.min_clients):
            raise TooFewContributors(
                f"{self._who()}: {len(u2)} lab(s) shared keys < threshold t={self.t} / "
                f"min_clients={self.params.min_clients}: refusing to mask")
        for v in u2:
            if v == self.client_id:
                continue
            if v not in ciphertexts:
                raise ValueError(f"{self._who()}: no shares from lab {v!r} relayed, though the "
                                 "server lists it among the labs that shared keys")
            data = bytes(ciphertexts[v])
            key = _agree(self._c, self.roster[v][0], "shares", self.rnd, v, self.client_id)
            try:
                plain = AESGCM(key).decrypt(data[:12], data[12:],
                                            _share_aad(self.rnd, v, self.client_id))
            except Exception as e:
                raise ValueError(f"{self._who()}: the shares relayed from lab {v!r} do not "
                                 "decrypt (tampered, or meant for another lab or round)") from e
            n = shamir.SHARE_BYTES
            self.shares[v] = (shamir.share_value(plain[:n]), shamir.share_value(plain[n:]))
        self.u2 = u2

    def mask(self, x: np.ndarray) -> bytes:
        """``y_u`` (bytes, uint64 little-endian) of the fixed-point vector ``x`` (uint64)."""
        if not self.u2:
            raise RuntimeError(f"{self._who()}: receive_shares() comes before mask()")
        if self.masked:  # the same masks on two inputs would give away their difference
            raise RuntimeError(f"{self._who()}: masks one input per round; start a new round")
        bits = self.params.mask_bits
        y = np.asarray(x, np.uint64) + prg(self._b, len(x), bits)
        me = self.u2.index(self.client_id)
        for j, v in enumerate(self.u2):
            if v == self.client_id:
                continue
            p = prg(pair_seed(self._s, self.roster[v][1], self.rnd, self.client_id, v), len(x),
                    bits)
            y = y + p if j > me else y - p  # uint64 wraps mod 2^64
        self.masked = True
        return (y & _modmask(bits)).astype("<u8").tobytes()

    # -- step 3 ---------------------------------------------------------------------------------

    def unmask(self, survivors: Sequence[str], dropped: Sequence[str]
               ) -> dict[str, dict[str, bytes]]:
        """This lab's shares for the unmasking: ``{"b": {v: share of b_v} for v in survivors,
        "s": {v: share of s_v^SK} for v in dropped}``, after the honest lab's checks."""
        survivors, dropped = [str(c) for c in survivors], [str(c) for c in dropped]
        refuse = f"{self._who()} refuses to unmask"
        if not self.masked:
            raise PermissionError(f"{refuse}: it sent no masked input this round")
        both = sorted(set(survivors) & set(dropped))
        if both:
            raise PermissionError(f"{refuse}: {both} listed as both survivor and dropped "
                                  "(that would reveal both of their secrets)")
        if self.client_id not in survivors:
            raise PermissionError(f"{refuse}: the request lists this lab as dropped")
        if sorted(survivors + dropped) != sorted(self.u2):
            raise PermissionError(f"{refuse}: survivors {survivors} and dropped {dropped} are "
                                  f"not the labs that shared keys {self.u2}")
        floor = max(self.t, self.params.min_clients)
        if len(survivors) < floor:
            raise TooFewContributors(f"{refuse}: {len(survivors)} survivor(s) < "
                                     f"max(t={self.t}, min_clients={self.params.min_clients})")
        conflict = sorted((set(survivors) & self.revealed["s"]) |
                          (set(dropped) & self.revealed["b"]))
        if conflict:
            raise PermissionError(f"{refuse}: it already revealed the other secret of "
                                  f"{conflict} this round")
        self.revealed["b"] |= set(survivors)
        self.revealed["s"] |= set(dropped)
        return {"b": {v: shamir.share_bytes(self.shares[v][0]) for v in survivors},
                "s": {v: shamir.share_bytes(self.shares[v][1]) for v in dropped}}

    # -- storage between Flower messages ------------------------------------------------------

    def to_state(self) -> bytes:
        """Everything of this party, for the lab's own storage (secrets included)."""
        return json.dumps({
            "client": self.client_id, "round": self.rnd, "c": self._c.hex(), "s": self._s.hex(),
            "b": self._b.hex() if self._b else None, "t": self.t,
            "roster": [[k, c.hex(), s.hex()] for k, (c, s) in self.roster.items()],
            "u2": self.u2, "shares": {k: [b, s] for k, (b, s) in self.shares.items()},
            "masked": self.masked, "revealed": {k: sorted(v) for k, v in self.revealed.items()},
        }).encode()

    @classmethod
    def from_state(cls, blob: bytes, params: MaskParams) -> SecAggParty:
        d = json.loads(bytes(blob).decode())
        party = cls.__new__(cls)
        party.client_id, party.rnd, party.params = d["client"], int(d["round"]), params
        party._c, party._s = bytes.fromhex(d["c"]), bytes.fromhex(d["s"])
        party._b = bytes.fromhex(d["b"]) if d["b"] else None
        party.t = int(d["t"])
        party.roster = {k: (bytes.fromhex(c), bytes.fromhex(s)) for k, c, s in d["roster"]}
        party.u2 = list(d["u2"])
        party.shares = {k: (int(b), int(s)) for k, (b, s) in d["shares"].items()}
        party.masked = bool(d["masked"])
        party.revealed = {k: set(v) for k, v in d["revealed"].items()}
        return party


class SecAggServer:
    """The server's side of one round: it relays and adds, never holding a secret of a lab.

    ``held`` keeps everything the server received (public keys, ciphertexts, masked vectors,
    shares by kind and owner), for audits and the tests' attacker.
    """

    def __init__(self, rnd: int, client_ids: Sequence[str], params: MaskParams) -> None:
        self.rnd, self.params = int(rnd), params
        self.selected = [str(c) for c in client_ids]
        self.t = 0
        self.roster: Roster = {}
        self.u2: list[str] = []
        self.u3: list[str] = []
        self.total: np.ndarray | None = None
        self.held: dict = {"keys": {}, "ciphertexts": {}, "masked": {}, "late": {},
                           "shares": {"b": {}, "s": {}}}

    def _floor(self, what: str, n: int) -> None:
        floor = max(self.t, int(self.params.min_clients))
        if n < floor:
            raise TooFewContributors(
                f"secagg round {self.rnd}: {n} lab(s) {what} < max(threshold t={self.t}, "
                f"min_clients={self.params.min_clients}): the round is skipped, nothing is "
                "unmasked")

    def receive_keys(self, adverts: Mapping[str, tuple[bytes, bytes]]) -> Roster:
        """U1 from the labs' public keys; returns the roster to relay to all of them."""
        strangers = sorted(set(map(str, adverts)) - set(self.selected))
        if strangers:
            raise ValueError(f"secagg round {self.rnd}: keys from labs {strangers} that were "
                             f"not selected ({self.selected})")
        self.roster = {c: (bytes(adverts[c][0]), bytes(adverts[c][1]))
                       for c in self.selected if c in adverts}
        self.held["keys"] = dict(self.roster)
        self.t = threshold_for(len(self.roster), self.params)
        self._floor("joined the key exchange", len(self.roster))
        return dict(self.roster)

    def receive_shares(self, ciphertexts: Mapping[str, Mapping[str, bytes]]
                       ) -> dict[str, dict[str, bytes]]:
        """U2 from the labs' encrypted shares (sender -> {receiver: ciphertext}); returns what
        to relay to each lab of U2 (receiver -> {sender: ciphertext})."""
        for u, cts in ciphertexts.items():
            if u not in self.roster:
                raise ValueError(f"secagg round {self.rnd}: shares from lab {u!r}, which is not "
                                 "in the key exchange")
            missing = [v for v in self.roster if v != u and v not in cts]
            if missing:
                raise ValueError(f"secagg round {self.rnd}: lab {u!r} sent no shares for "
                                 f"{missing}")
        self.u2 = [c for c in self.roster if c in ciphertexts]
        self.held["ciphertexts"] = {u: dict(ciphertexts[u]) for u in self.u2}
        self._floor("shared their keys", len(self.u2))
        return {v: {u: bytes(ciphertexts[u][v]) for u in self.u2 if u != v} for v in self.u2}

    def receive_masked(self, payloads: Mapping[str, bytes]) -> bytes:
        """U3 from the masked inputs that arrived (all counted); returns their sum mod 2^k."""
        if self.total is not None:
            raise RuntimeError(f"secagg round {self.rnd}: the masked inputs were collected "
                               "already; a late one cannot join the sum")
        strangers = sorted(set(map(str, payloads)) - set(self.u2))
        if strangers:
            raise ValueError(f"secagg round {self.rnd}: masked inputs from {strangers}, which "
                             "did not share keys")
        self.u3 = [c for c in self.u2 if c in payloads]
        self.held["masked"] = {c: bytes(payloads[c]) for c in self.u3}
        total = None
        for c in self.u3:
            v = np.frombuffer(payloads[c], dtype="<u8").astype(np.uint64)
            if total is not None and len(v) != len(total):
                raise ValueError(f"secagg round {self.rnd}: the masked input of {c!r} has "
                                 f"{len(v)} values, not {len(total)}")
            total = v.copy() if total is None else total + v
        self.total = total & _modmask(self.params.mask_bits) if total is not None \
            else np.zeros(0, np.uint64)
        return self.total.astype("<u8").tobytes()

    def receive_late(self, client_id: str, payload: bytes) -> None:
        """A masked input that arrives after the collection closed: it stays out of the sum,
        and nothing the protocol hands out unmasks it (the lab's self mask stays on). Kept in
        ``held["late"]``, as a curious server would keep it."""
        self.held["late"][str(client_id)] = bytes(payload)

    def unmask_request(self) -> tuple[list[str], list[str]]:
        """``(survivors U3, dropped U2 - U3)``: what every survivor is asked to unmask.
        Raises :class:`TooFewContributors` (and nobody is asked) below the floor."""
        self._floor("sent a masked input", len(self.u3))
        return list(self.u3), [c for c in self.u2 if c not in self.u3]

    def unmask(self, responses: Mapping[str, Mapping[str, Mapping[str, bytes]]],
               total: bytes | None = None) -> tuple[np.ndarray, float]:
        """``(sum of n_u w_u (D,), N)`` over U3 from the survivors' answers (lab ->
        :meth:`SecAggParty.unmask`'s dict); any ``t`` of them suffice."""
        survivors, dropped = self.unmask_request()
        answers = {u: r for u, r in responses.items() if u in survivors}
        if len(answers) < self.t:
            raise TooFewContributors(
                f"secagg round {self.rnd}: {len(answers)} lab(s) answered the unmasking < "
                f"threshold t={self.t}: the round is skipped")
        index = {c: i for i, c in enumerate(self.roster, start=1)}
        for u, r in answers.items():
            lacking = [v for v in survivors if v not in r.get("b", {})] + \
                [v for v in dropped if v not in r.get("s", {})]
            if lacking:
                raise ValueError(f"secagg round {self.rnd}: lab {u!r} answered the unmasking "
                                 f"without shares for {lacking}")
            for kind, owners in (("b", survivors), ("s", dropped)):
                for v in owners:
                    self.held["shares"][kind].setdefault(v, {})[index[u]] = \
                        shamir.share_value(bytes(r[kind][v]))
        bits = self.params.mask_bits
        acc = np.frombuffer(total, "<u8").astype(np.uint64) if total is not None \
            else self.total.copy()
        for v in survivors:  # self masks
            b = shamir.combine(self.held["shares"]["b"][v], self.t)
            acc = acc - prg(b, len(acc), bits)
        order = {c: k for k, c in enumerate(self.u2)}
        for d in dropped:  # the pairwise masks the survivors share with dropped labs
            s_sk = shamir.combine(self.held["shares"]["s"][d], self.t)
            if _public(X25519PrivateKey.from_private_bytes(s_sk)) != self.roster[d][1]:
                raise ValueError(f"secagg round {self.rnd}: the shares of lab {d!r}'s key do "
                                 "not rebuild its advertised public key (corrupted shares)")
            for u in survivors:
                p = prg(pair_seed(s_sk, self.roster[u][1], self.rnd, d, u), len(acc), bits)
                # u added +p if d comes after it in U2, else -p
                acc = acc - p if order[d] > order[u] else acc + p
        vec = decode_fixed(acc & _modmask(bits), self.params.frac_bits, bits)
        return vec[:-1], float(vec[-1])


def curious_estimate(server: SecAggServer, target: str) -> np.ndarray | None:
    """What an honest-but-curious server rebuilds of lab ``target``'s vector ``[n w, n]``
    (D + 1,) from everything it holds: the target's masked input (``held["masked"]``, or one
    that arrived after the collection closed, ``held["late"]``) minus every mask it can
    regenerate: the self mask if it holds ``t`` shares of ``b_target``, and each pairwise mask
    with a lab whose key (the target's, or the other lab's) ``t`` held shares rebuild. None:
    no masked input of the target reached the server. Under this protocol the estimate is
    uniform noise for every lab (tests, and the privacy audit's late-lab scenario)."""
    held = server.held
    data = held["masked"].get(target, held.get("late", {}).get(target))
    if data is None:
        return None
    bits, t = server.params.mask_bits, server.t
    y = np.frombuffer(data, "<u8").astype(np.uint64)
    shares = held["shares"]
    if len(shares["b"].get(target, {})) >= t:
        y = y - prg(shamir.combine(shares["b"][target], t), len(y), bits)
    keys = {v: shamir.combine(sh, t) for v, sh in shares["s"].items() if len(sh) >= t}
    order = {c: k for k, c in enumerate(server.u2)}
    for v in server.u2:
        if v == target or not ({v, target} & set(keys)):
            continue
        seed = pair_seed(keys[target], server.roster[v][1], server.rnd, target, v) \
            if target in keys else pair_seed(keys[v], server.roster[target][1], server.rnd,
                                             v, target)
        p = prg(seed, len(y), bits)
        y = y - p if order[v] > order[target] else y + p  # as the target added it
    return decode_fixed(y & _modmask(bits), server.params.frac_bits, bits)


class MaskedAggregation(SecureAggregation):
    """Threshold secure aggregation (:mod:`mer.privacy.secagg`) behind the loop's interface.

    In-process, :meth:`begin_round` plays every lab's :class:`SecAggParty` and the
    :class:`SecAggServer` through the key and share steps (the simulation);
    :meth:`client_payload` masks one lab's vector with its own party, :meth:`server_sum` is the
    server's collection of masked inputs and :meth:`decode_sum` the unmasking, with the
    survivors' answers. Over Flower the nodes and the server call the same objects
    themselves; :meth:`encode` is the lab's checked fixed-point encoding either way.
    """

    name = "secagg"

    def __init__(self, params: MaskParams | None = None) -> None:
        super().__init__()
        self.params = params or MaskParams()
        self.parties: dict[str, SecAggParty] = {}
        self.server: SecAggServer | None = None

    def begin_round(self, rnd: int, client_ids: Sequence[str], template: Weights) -> None:
        """In-process: every lab's party and the server, through steps 0 and 1."""
        super().begin_round(rnd, client_ids, template)
        self.server = SecAggServer(self.rnd, self.round_clients, self.params)
        self.parties = {c: SecAggParty(c, self.rnd, self.params) for c in self.round_clients}
        roster = self.server.receive_keys({c: p.advertise() for c, p in self.parties.items()})
        relayed = self.server.receive_shares({c: p.share_keys(roster)
                                              for c, p in self.parties.items()})
        for c, p in self.parties.items():
            p.receive_shares(relayed[c], self.server.u2)

    def begin_lab_round(self, rnd: int, client_ids: Sequence[str], template: Weights,
                        party: SecAggParty) -> None:
        """Over Flower, one lab's side: the round's labs (U2) and its own party only."""
        SecureAggregation.begin_round(self, rnd, client_ids, template)
        if party.client_id not in self.round_clients or party.rnd != self.rnd:
            raise ValueError(f"secagg: the party of lab {party.client_id!r} (round "
                             f"{party.rnd}) is not one of round {self.rnd}'s {client_ids}")
        self.parties, self.server = {party.client_id: party}, None

    def begin_server_round(self, rnd: int, client_ids: Sequence[str], template: Weights
                           ) -> SecAggServer:
        """Over Flower, the server's side: no lab's secrets, a fresh :class:`SecAggServer`."""
        SecureAggregation.begin_round(self, rnd, client_ids, template)
        self.parties, self.server = {}, SecAggServer(self.rnd, self.round_clients, self.params)
        return self.server

    def encode(self, client_id: str, weights: Weights, n: int, n_clients: int) -> np.ndarray:
        """``[n w, n]`` as fixed point mod 2^k (uint64), refused when non-finite or beyond the
        range a sum of ``n_clients`` labs can hold."""
        self.layout.check(weights, f"secagg: client {client_id!r}")
        check_finite(weights, f"secagg: client {client_id!r}")
        p = self.params
        x = weighted_vector(weights, n)
        bound = 2.0 ** (p.mask_bits - 1 - p.frac_bits) / max(int(n_clients), 1)
        peak = float(np.abs(x).max())
        if peak >= bound:
            raise OverflowError(
                f"secagg: client {client_id!r}: |n * w| reaches {peak:.3g}, beyond "
                f"the fixed-point range {bound:.3g} of mask_bits={p.mask_bits}, "
                f"frac_bits={p.frac_bits} with {n_clients} clients; lower "
                "privacy.frac_bits or raise privacy.mask_bits")
        return encode_fixed(x, p.frac_bits, p.mask_bits)

    def client_payload(self, client_id: str, weights: Weights, n: int) -> bytes:
        self._require_client(client_id)
        if client_id not in self.parties:
            raise ValueError(f"secagg: no secrets of client {client_id!r} here (the server's "
                             "side of the round?)")
        party = self.parties[client_id]
        return party.mask(self.encode(client_id, weights, n, len(party.u2)))

    def server_sum(self, payloads: Mapping[str, bytes]) -> bytes:
        if not payloads:
            raise ValueError("secagg: no payloads")
        if self.server is None:
            raise RuntimeError("secagg: call begin_round() before server_sum()")
        return self.server.receive_masked(payloads)

    def decode_sum(self, sum_payload: bytes, survivors: Sequence[str]
                   ) -> tuple[np.ndarray, float]:
        """Unmask the sum of the survivors' (U3's) vectors with their parties' answers."""
        survivors = [str(s) for s in survivors]
        if self.server is None or self.server.total is None:
            raise RuntimeError("secagg: server_sum() comes before decode_sum()")
        if sorted(survivors) != sorted(self.server.u3):
            raise ValueError(f"secagg: survivors {survivors} are not the labs whose masked "
                             f"input was summed {self.server.u3}")
        request = self.server.unmask_request()
        answers = {u: self.parties[u].unmask(*request) for u in request[0]}
        flat, count = self.server.unmask(answers, sum_payload)
        if len(flat) != self.layout.size:
            raise ValueError(f"secagg: {len(flat) + 1} values for a model of "
                             f"{self.layout.size} (+1 count)")
        return flat, count
