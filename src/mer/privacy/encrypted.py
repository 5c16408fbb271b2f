"""Encrypted aggregation with CKKS (TenSEAL): the server adds ciphertexts it cannot read.

Setup (once per federation): the key holder makes a CKKS context with a secret key and shares
it with the clients over their own secure channels; the server receives the context
serialised *without* the secret key (``is_private() == False``): enough to load and add
ciphertexts, not to decrypt them. ``python -m mer.privacy.keys --out keys/`` writes the two
files (:func:`write_key_files`); ``privacy.secret_context`` / ``privacy.public_context`` point
a lab's and the server's config at them (over Flower). With neither set, an in-process run
makes a fresh pair.

Each round a client encrypts its vector ``[n_k * w_k, n_k]`` (all layers flattened, D + 1
values; see :mod:`mer.privacy.base`) in big flat chunks, one CKKS vector filling one
ciphertext (``poly_modulus_degree / 2`` slots) each, serialises them and sends the bytes.
The server loads them under its public context, adds them and sends the sum back; a key
holder decrypts it to ``(sum n_k w_k, N)`` and divides. Only additions are done, so no
rescaling level is needed: ``coeff_mod_bit_sizes = [60, 60]`` (one 60-bit data prime; the
last is the special key-switching prime) gives the smallest, fastest ciphertexts (8x the
float32 bytes; N = 8192 keeps 128-bit security up to 218 bits).

Precision and range: CKKS is approximate; with a scale of 2^40 the mean differs from
plaintext FedAvg by about 1e-7 (``scripts/bench_privacy.py``). Sums must stay below
``2^(data bits - scale_bits - 1)`` = 2^19 in magnitude: each client checks
``K * max |n_k w_k|`` against it and refuses with a clear error (then add a data prime, e.g.
``[60, 40, 60]``, at twice the bytes, or lower ``scale_bits``).

What is revealed: nothing about an individual update to the server; the aggregate to every
key holder (the clients), and to the server if it is sent back for a server optimiser step.
A key holder decrypts no sum of fewer than ``min_clients`` contributors (default 3): with one,
the "mean" would be that lab's model. Input that is not finite is refused before encryption.
(CKKS itself does not survive a key holder colluding with the server: every lab holds the
secret key. :mod:`mer.privacy.secagg` tolerates up to t - 1 colluding labs.)
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tenseal as ts

from mer.privacy.base import (
    SecureAggregation,
    Weights,
    check_finite,
    require_contributors,
    weighted_vector,
)


def _pack(chunks: list[bytes]) -> bytes:
    """Frame serialised chunks as one payload: per chunk an 8-byte length, then the bytes."""
    return b"".join(part for c in chunks for part in (struct.pack("<Q", len(c)), c))


def _unpack(payload: bytes) -> list[bytes]:
    chunks, pos = [], 0
    while pos < len(payload):
        (size,) = struct.unpack_from("<Q", payload, pos)
        chunks.append(payload[pos + 8:pos + 8 + size])
        pos += 8 + size
    return chunks


@dataclass
class CKKSParams:
    """CKKS parameters (``conf/privacy/ckks.yaml``).

    Attributes:
        poly_modulus_degree: ring dimension N; N / 2 slots per ciphertext.
        coeff_mod_bit_sizes: bit sizes of the coefficient modulus primes; all but the last
            (the special prime) hold data, and bound the values: |sum| < 2^(data bits -
            scale_bits - 1).
        scale_bits: log2 of the encoding scale (precision ~ 2^-scale_bits relative).
        chunk_size: values per CKKS vector; the default N / 2 fills one ciphertext each (0:
            the whole model in one vector, which TenSEAL splits into ciphertexts itself, at
            the same cost, but warning on stderr that some operations are disabled).
        symmetric: encrypt with the secret key (the clients hold it anyway): about twice as
            fast as public-key encryption, same ciphertexts for the server.
        n_threads: TenSEAL threads (0: TenSEAL's default, all cores).
        secret_context: a key holder's context file (secret key included; a lab's own):
            the key parameters above are then those of the file.
        public_context: the server's context file (no secret key). Set alone, this party
            can add ciphertexts but neither encrypt nor decrypt: the server's role.
        min_clients: the fewest contributors whose sum a key holder decrypts; a round with
            fewer is skipped.
        disclose_per_lab: each lab also sends its own test confusion matrix in plaintext
            (per-lab results at the server): an opt-in disclosure, off by default.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: list[int] = field(default_factory=lambda: [60, 60])
    scale_bits: int = 40
    chunk_size: int = 4096
    symmetric: bool = True
    n_threads: int = 0
    secret_context: str | None = None
    public_context: str | None = None
    min_clients: int = 3
    disclose_per_lab: bool = False

    def __post_init__(self) -> None:
        if int(self.min_clients) < 2:
            raise ValueError(f"ckks: privacy.min_clients must be >= 2 (a sum of one lab is "
                             f"its update), got {self.min_clients}")


def make_context(params: CKKSParams) -> ts.Context:
    """A private CKKS context (secret key included): the key holders' context."""
    enc = ts.ENCRYPTION_TYPE.SYMMETRIC if params.symmetric else ts.ENCRYPTION_TYPE.ASYMMETRIC
    kwargs = {"n_threads": params.n_threads} if params.n_threads else {}
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                     encryption_type=enc, **kwargs)
    ctx.global_scale = 2.0 ** params.scale_bits
    return ctx


def public_context_bytes(ctx: ts.Context) -> bytes:
    """The context as the server gets it: serialised without the secret key."""
    return ctx.serialize(save_secret_key=False)


SECRET_FILE, PUBLIC_FILE = "ckks-secret.ctx", "ckks-public.ctx"


def write_key_files(params: CKKSParams, folder: str | Path) -> tuple[Path, Path]:
    """A fresh context pair: ``ckks-secret.ctx`` (every lab's, readable by its owner only)
    and ``ckks-public.ctx`` (the server's, no secret key) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ctx = make_context(params)
    secret, public = folder / SECRET_FILE, folder / PUBLIC_FILE
    secret.write_bytes(b"")
    secret.chmod(0o600)  # before the key goes in
    secret.write_bytes(ctx.serialize(save_secret_key=True))
    public.write_bytes(public_context_bytes(ctx))
    return secret, public


def _varint(f, path: Path) -> int:
    value, shift = 0, 0
    while True:
        byte = f.read(1)
        if not byte:
            raise ValueError(f"ckks: {path} ends inside a field: not a TenSEAL context file")
        value |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            return value


def holds_secret_key(path: str | Path) -> bool:
    """Whether a TenSEAL context file carries a secret key, read from its framing alone.

    The file is a ``TenSEALContextProto`` (tenseal/proto/tensealcontext.proto): field 3,
    ``private_context``, holds the secret key. Only the field tags and lengths are read (the
    fields' bytes are skipped with ``seek``), so a server handed the secret file by mistake
    refuses it without the secret ever being read into memory or deserialised.
    """
    path = Path(path).expanduser()
    size = path.stat().st_size
    with open(path, "rb") as f:
        while f.tell() < size:
            tag = _varint(f, path)
            field, wire = tag >> 3, tag & 7
            if wire == 0:
                _varint(f, path)
            elif wire == 2:
                length = _varint(f, path)
                if field == 3 and length > 0:
                    return True
                f.seek(length, 1)
            elif wire in (1, 5):
                f.seek(8 if wire == 1 else 4, 1)
            else:
                raise ValueError(f"ckks: {path} is not a TenSEAL context file (wire type "
                                 f"{wire})")
    return False


class KeyFileError(ValueError):
    """A CKKS key file that is not a TenSEAL context, or lacks the secret key a lab needs."""


class KeyFileMissing(FileNotFoundError):
    """A CKKS key file named in the config does not exist."""


class KeyFileRoleError(PermissionError):
    """The secret key file handed to the server."""


def load_context(path: str | Path, private: bool) -> ts.Context:
    """A context file as written by :func:`write_key_files`, checked for its role; the
    server's (``private=False``) is checked before it is loaded (:func:`holds_secret_key`).
    mer's own errors (the entry points print them as ``mer: ...``), naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KeyFileMissing(f"ckks: no context file {path}; make the pair with "
                             "python -m mer.privacy.keys --out DIR")
    try:
        secret = not private and holds_secret_key(path)
    except ValueError as e:
        raise KeyFileError(str(e)) from e
    if secret:
        raise KeyFileRoleError(f"ckks: {path} holds the secret key: the server must get "
                               f"only {PUBLIC_FILE} (privacy.public_context); it was not "
                               "loaded")
    try:
        ctx = ts.context_from(path.read_bytes())
    except Exception as e:
        raise KeyFileError(f"ckks: {path} is not a TenSEAL context file ({e})") from e
    if private and not ctx.is_private():
        raise KeyFileError(f"ckks: {path} holds no secret key: a lab needs {SECRET_FILE} "
                           "(privacy.secret_context), the server the public one")
    if not private and ctx.is_private():
        raise KeyFileRoleError(f"ckks: {path} holds the secret key: the server must get "
                               f"only {PUBLIC_FILE} (privacy.public_context)")
    return ctx


def encrypt(ctx: ts.Context, vector: np.ndarray, chunk_size: int = 0) -> bytes:
    """Encrypt a float vector (D,) as CKKS vectors of ``chunk_size`` values -> bytes."""
    step = chunk_size if chunk_size > 0 else max(len(vector), 1)
    return _pack([ts.ckks_vector(ctx, vector[i:i + step]).serialize()
                  for i in range(0, len(vector), step)])


def add_encrypted(public_ctx: ts.Context, payloads: Sequence[bytes]) -> bytes:
    """Sum of encrypted payloads (same chunking) under a public context -> bytes."""
    if not payloads:
        raise ValueError("add_encrypted: no payloads")
    total = None
    for payload in payloads:
        chunks = [ts.ckks_vector_from(public_ctx, c) for c in _unpack(payload)]
        if total is None:
            total = chunks
        elif len(chunks) != len(total):
            raise ValueError("add_encrypted: payloads differ in chunking (another layout?)")
        else:
            for acc, c in zip(total, chunks):
                acc.add_(c)
    return _pack([c.serialize() for c in total])


def decrypt(ctx: ts.Context, payload: bytes) -> np.ndarray:
    """Decrypt a payload with a private context -> float64 vector."""
    if not ctx.is_private():
        raise PermissionError("decrypt: this context has no secret key (the server's?)")
    return np.concatenate([np.asarray(ts.ckks_vector_from(ctx, c).decrypt(), np.float64)
                           for c in _unpack(payload)])


class CKKSAggregation(SecureAggregation):
    """Secure aggregation by CKKS encryption (:mod:`mer.privacy.encrypted`).

    In an in-process run the object plays both roles, kept apart: the key holders' private
    context (``client_context``, used by :meth:`client_payload` and :meth:`decode_sum`) and
    the server's public one (``server_context``, the only one :meth:`server_sum` touches).
    Over Flower each party loads its own file: a lab ``params.secret_context``, the server
    ``params.public_context`` alone (``client_context`` is then None).
    """

    name = "ckks"

    def __init__(self, params: CKKSParams | None = None) -> None:
        super().__init__()
        self.params = params or CKKSParams()
        p = self.params
        if p.secret_context:
            self.client_context: ts.Context | None = load_context(p.secret_context, True)
        elif p.public_context:
            self.client_context = None
        else:
            self.client_context = make_context(p)
        self.server_context = load_context(p.public_context, False) if p.public_context \
            else ts.context_from(public_context_bytes(self.client_context))

    def _key_holder(self, what: str) -> ts.Context:
        if self.client_context is None:
            raise PermissionError(f"ckks: this party holds no secret key (the server's role) "
                                  f"and cannot {what}; a lab does that with "
                                  "privacy.secret_context")
        return self.client_context

    def client_payload(self, client_id: str, weights: Weights, n: int) -> bytes:
        self._require_client(client_id)
        self.layout.check(weights, f"ckks: client {client_id!r}")
        check_finite(weights, f"ckks: client {client_id!r}")
        x = weighted_vector(weights, n)
        data_bits = sum(self.params.coeff_mod_bit_sizes[:-1])
        bound = 2.0 ** (data_bits - self.params.scale_bits - 1) / len(self.round_clients)
        peak = float(np.abs(x).max())
        if peak >= bound:
            raise OverflowError(
                f"ckks: client {client_id!r}: |n * w| reaches {peak:.3g}, beyond "
                f"the range {bound:.3g} of coeff_mod_bit_sizes="
                f"{list(self.params.coeff_mod_bit_sizes)}, scale_bits={self.params.scale_bits}"
                f" with {len(self.round_clients)} clients; add a data prime (e.g. [60, 40, "
                "60]) or lower privacy.scale_bits")
        return encrypt(self._key_holder("encrypt"), x, self.params.chunk_size)

    def server_sum(self, payloads: Mapping[str, bytes]) -> bytes:
        return add_encrypted(self.server_context, list(payloads.values()))

    def decode_sum(self, sum_payload: bytes, survivors: Sequence[str]) -> tuple[np.ndarray, float]:
        """Decrypt the sum of the ``survivors``' payloads; refused (:class:`TooFewContributors`,
        before any decryption) for fewer than ``min_clients`` of them."""
        require_contributors(len(survivors), self.min_clients,
                             f"ckks round {self.rnd}: survivors {list(survivors)}")
        vec = decrypt(self._key_holder("decrypt"), sum_payload)
        if len(vec) != self.layout.size + 1:
            raise ValueError(f"ckks: decrypted {len(vec)} values for a model of "
                             f"{self.layout.size} (+1 count)")
        return vec[:-1], float(vec[-1])
