"""Secure aggregation by pairwise additive masks (after Bonawitz et al., CCS 2017).

Per round, for the selected clients 1..K (in the round's order):

1. Key agreement. Each client makes a fresh X25519 key pair and publishes the public key
   through the server. Clients i and j derive the same 32-byte seed
   ``s_ij = HKDF-SHA256(X25519(sk_i, pk_j), info = round, i, j)``; the server, holding only
   public keys, cannot. Fresh keys and the round in ``info`` make every round's masks new.
2. Masking. A client quantises its vector ``x_i = [n_i * w_i, n_i]`` (D + 1 values, see
   :mod:`mer.privacy.base`) to fixed point, ``round(x * 2^frac_bits)`` as integers mod
   ``2^mask_bits``, and adds ``sum_{j > i} PRG(s_ij) - sum_{j < i} PRG(s_ij)`` (mod 2^k).
   PRG = AES-256-CTR keystream under the seed, read as (D + 1) integers mod 2^k: each masked
   vector on its own is uniformly distributed, whatever ``x_i`` is.
3. The server adds the masked vectors mod 2^k: every pair's masks cancel and the sum of the
   ``x_i`` remains; it decodes it to ``(sum n_i w_i, N)``.

Dropout after masking: when some selected clients' vectors never arrive, the masks they
share with the survivors do not cancel. Recovery used here: the server names the dropped
clients and each survivor reveals its pairwise seeds *with the dropped clients only*; the
server regenerates those masks and removes them. A survivor's seeds with other survivors stay
secret, so no survivor's vector is exposed (needs at least ``min_survivors`` survivors; with
one, the sum would be its update).

Roles: in an in-process run :meth:`MaskedAggregation.begin_round` makes every client's
secrets in one object (the simulation). Over Flower (:mod:`mer.federated.flower_app`) each
lab holds only its own :class:`MaskingParty` (its private key stays on its node between the
key exchange and the masking) and :meth:`MaskedAggregation.begin_client_round`; the server
holds none (:meth:`MaskedAggregation.begin_server_round`) and unmasks with the seeds the
survivors reveal (``decode_sum(..., revealed=...)``).

Limits (documented, not handled): this is the single-mask variant for an honest-but-curious
server. A dropped client's vector arriving *after* the recovery would be readable by the
server, so the server must close the round before asking for seeds; Bonawitz et al. add a
self mask and t-of-n Shamir shares of the keys to guard against that and against a server
lying about who dropped. Precision: quantisation error ``2^-(frac_bits + 1)`` per value and
client (3e-8 at the default 24 bits), before dividing by N.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mer.privacy.base import SecureAggregation, Weights, weighted_vector


@dataclass
class MaskParams:
    """Fixed-point masking parameters (``conf/privacy/secagg.yaml``).

    Attributes:
        mask_bits: arithmetic mod 2^mask_bits (8..64).
        frac_bits: fixed-point fraction bits; ``|sum n_k w_k| * 2^frac_bits`` must stay below
            ``2^(mask_bits - 1)`` (checked on each client with the round's client count).
        min_survivors: refuse to unmask a sum of fewer clients.
    """

    mask_bits: int = 64
    frac_bits: int = 24
    min_survivors: int = 2


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


class MaskingParty:
    """One client's secrets for one round: its X25519 key and the others' public keys."""

    def __init__(self, client_id: str, rnd: int, private_key: bytes | None = None) -> None:
        self.client_id, self.rnd = client_id, rnd
        self._key = X25519PrivateKey.from_private_bytes(private_key) if private_key \
            else X25519PrivateKey.generate()
        self.peers: dict[str, bytes] = {}

    def private_bytes(self) -> bytes:
        """The raw private key, for the client's own storage between two messages."""
        return self._key.private_bytes(serialization.Encoding.Raw,
                                       serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption())

    def public_key(self) -> bytes:
        return self._key.public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw)

    def seed_with(self, other: str) -> bytes:
        if other not in self.peers:
            raise ValueError(f"secagg: client {self.client_id!r} has no public key of "
                             f"{other!r} for round {self.rnd}")
        shared = self._key.exchange(X25519PublicKey.from_public_bytes(self.peers[other]))
        a, b = sorted((self.client_id, other))
        info = f"mer-secagg|round {self.rnd}|{a}|{b}".encode()
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)

    def reveal(self, dropped: Sequence[str]) -> dict[str, bytes]:
        """Seeds shared with clients the server declares dropped (dropout recovery)."""
        if self.client_id in dropped:
            raise ValueError(f"secagg: client {self.client_id!r} is alive, not dropped")
        return {d: self.seed_with(d) for d in dropped}


class MaskedAggregation(SecureAggregation):
    """Secure aggregation by pairwise masks (:mod:`mer.privacy.secagg`).

    ``_parties`` holds the client secrets this object may use: every client's in the
    in-process simulation, one lab's over Flower, none at the server. They are used only by
    :meth:`client_payload` and, for seeds with dropped clients, by the recovery step;
    :meth:`server_sum` and the unmasking in :meth:`decode_sum` see only masked vectors,
    public keys and the revealed seeds of dropped clients.
    """

    name = "secagg"

    def __init__(self, params: MaskParams | None = None) -> None:
        super().__init__()
        self.params = params or MaskParams()
        if not 8 <= self.params.mask_bits <= 64:
            raise ValueError(f"secagg: mask_bits must be in [8, 64], got {self.params.mask_bits}")
        self._parties: dict[str, MaskingParty] = {}

    def begin_round(self, rnd: int, client_ids: Sequence[str], template: Weights) -> None:
        """In-process: every client's key pair, public keys exchanged (as the server would
        relay them)."""
        super().begin_round(rnd, client_ids, template)
        self._parties = {c: MaskingParty(c, self.rnd) for c in self.round_clients}
        public = {c: p.public_key() for c, p in self._parties.items()}
        for c, party in self._parties.items():
            party.peers = {o: k for o, k in public.items() if o != c}

    def begin_server_round(self, rnd: int, client_ids: Sequence[str], template: Weights) -> None:
        """The server's side of a round: no client secrets."""
        super().begin_round(rnd, client_ids, template)
        self._parties = {}

    def begin_client_round(self, rnd: int, client_ids: Sequence[str], template: Weights,
                           party: MaskingParty, public_keys: Mapping[str, bytes]) -> None:
        """One lab's side of a round: its own party and the others' public keys (relayed by
        the server: ``client id -> key`` of every client in ``client_ids``)."""
        super().begin_round(rnd, client_ids, template)
        missing = [c for c in self.round_clients if c not in public_keys]
        if missing or party.client_id not in self.round_clients or party.rnd != self.rnd:
            raise ValueError(f"secagg: client {party.client_id!r} (round {party.rnd}) cannot "
                             f"mask round {self.rnd} of {self.round_clients}: public keys "
                             f"missing for {missing}")
        party.peers = {c: bytes(public_keys[c]) for c in self.round_clients
                       if c != party.client_id}
        self._parties = {party.client_id: party}

    def reveal(self, client_id: str, dropped: Sequence[str]) -> dict[str, bytes]:
        """Client side of the dropout recovery: ``client_id``'s seeds with ``dropped``."""
        if client_id not in self._parties:
            raise ValueError(f"secagg: no secrets of client {client_id!r} here")
        return self._parties[client_id].reveal(dropped)

    def client_payload(self, client_id: str, weights: Weights, n: int) -> bytes:
        self._require_client(client_id)
        self.layout.check(weights, f"secagg: client {client_id!r}")
        p = self.params
        x = weighted_vector(weights, n)
        bound = 2.0 ** (p.mask_bits - 1 - p.frac_bits) / len(self.round_clients)
        if np.abs(x).max() >= bound:
            raise OverflowError(
                f"secagg: client {client_id!r}: |n * w| reaches {np.abs(x).max():.3g}, beyond "
                f"the fixed-point range {bound:.3g} of mask_bits={p.mask_bits}, "
                f"frac_bits={p.frac_bits} with {len(self.round_clients)} clients; lower "
                "privacy.frac_bits or raise privacy.mask_bits")
        masked = encode_fixed(x, p.frac_bits, p.mask_bits)
        if client_id not in self._parties:
            raise ValueError(f"secagg: no secrets of client {client_id!r} here (the server's "
                             "side of the round?)")
        party = self._parties[client_id]
        me = self.round_clients.index(client_id)
        for j, other in enumerate(self.round_clients):
            if other == client_id:
                continue
            mask = prg(party.seed_with(other), len(x), p.mask_bits)
            masked = masked + mask if j > me else masked - mask  # uint64 wraps mod 2^64
        return (masked & _modmask(p.mask_bits)).astype("<u8").tobytes()

    def server_sum(self, payloads: Mapping[str, bytes]) -> bytes:
        if not payloads:
            raise ValueError("secagg: no payloads")
        total = None
        for cid, payload in payloads.items():
            v = np.frombuffer(payload, dtype="<u8").astype(np.uint64)
            if total is not None and len(v) != len(total):
                raise ValueError(f"secagg: payload of {cid!r} has {len(v)} values, not "
                                 f"{len(total)}")
            total = v.copy() if total is None else total + v
        return (total & _modmask(self.params.mask_bits)).astype("<u8").tobytes()

    def decode_sum(self, sum_payload: bytes, survivors: Sequence[str],
                   revealed: Mapping[str, Mapping[str, bytes]] | None = None,
                   ) -> tuple[np.ndarray, float]:
        """Unmask the sum of the survivors' vectors. ``revealed``: survivor -> {dropped
        client -> seed}, as the survivors sent them (over Flower); None: from this object's
        own parties (in-process)."""
        p = self.params
        survivors = [str(s) for s in survivors]
        unknown = set(survivors) - set(self.round_clients)
        if unknown:
            raise ValueError(f"secagg: survivors {sorted(unknown)} were not in round {self.rnd}")
        if len(survivors) < p.min_survivors:
            raise ValueError(f"secagg: {len(survivors)} survivor(s) < min_survivors="
                             f"{p.min_survivors}: unmasking would expose an individual update")
        total = np.frombuffer(sum_payload, dtype="<u8").astype(np.uint64)
        dropped = [c for c in self.round_clients if c not in survivors]
        order = {c: k for k, c in enumerate(self.round_clients)}
        for s in survivors:  # each survivor reveals its seeds with the dropped clients
            if revealed is None:
                seeds = self._parties[s].reveal(dropped)
            else:
                lacking = [d for d in dropped if d not in revealed.get(s, {})]
                if lacking:
                    raise ValueError(f"secagg: survivor {s!r} revealed no seed with "
                                     f"{lacking}: the sum cannot be unmasked")
                seeds = {d: bytes(revealed[s][d]) for d in dropped}
            for d, seed in seeds.items():
                mask = prg(seed, len(total), p.mask_bits)
                # survivor s added +mask if d comes after it in the round's order, else -mask
                total = total - mask if order[d] > order[s] else total + mask
        vec = decode_fixed(total, p.frac_bits, p.mask_bits)
        if len(vec) != self.layout.size + 1:
            raise ValueError(f"secagg: {len(vec)} values for a model of {self.layout.size} "
                             "(+1 count)")
        return vec[:-1], float(vec[-1])
