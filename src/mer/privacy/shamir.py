"""Shamir secret sharing (t-of-n) of short byte strings over the prime field GF(2^521 - 1).

A secret ``s`` (at most 65 bytes, read as a big-endian integer below the prime ``p``) is the
constant term of a random polynomial ``f(x) = s + a_1 x + ... + a_{t-1} x^{t-1}`` (mod p);
share ``i`` (i = 1..n) is the point ``(i, f(i))``. Any ``t`` shares give ``s`` back by
Lagrange interpolation at 0; any ``t - 1`` of them are uniformly distributed whatever ``s``
is (information-theoretic: no computing power helps).

Used by :mod:`mer.privacy.secagg` to share each lab's self-mask seed and pairwise-key secret
(32 bytes each) among the labs of a round. ``p = 2^521 - 1`` is a Mersenne prime, so every
32-byte secret is a field element; a share is 66 bytes (:func:`share_bytes`).
"""

from __future__ import annotations

import secrets as _secrets
from collections.abc import Sequence

PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: bytes, n: int, t: int, prime: int = PRIME,
          randbelow=_secrets.randbelow) -> dict[int, int]:
    """``n`` shares ``{x: f(x)}`` (x = 1..n) of ``secret``; any ``t`` of them recover it.

    ``randbelow``: the coefficients' source (a CSPRNG: :func:`secrets.randbelow`; tests may
    pass a seeded one).
    """
    if not 1 <= t <= n:
        raise ValueError(f"shamir: threshold t={t} must be in [1, n={n}]")
    if n >= prime:
        raise ValueError(f"shamir: {n} shares need a field larger than {prime}")
    value = int.from_bytes(secret, "big")
    if value >= prime:
        raise ValueError(f"shamir: a secret of {len(secret)} bytes does not fit the field "
                         f"(p has {prime.bit_length()} bits)")
    coeffs = [value] + [randbelow(prime) for _ in range(t - 1)]
    return {x: _evaluate(coeffs, x, prime) for x in range(1, n + 1)}


def _evaluate(coeffs: Sequence[int], x: int, prime: int) -> int:
    y = 0
    for c in reversed(coeffs):  # Horner
        y = (y * x + c) % prime
    return y


def combine(shares: dict[int, int], t: int, length: int = 32, prime: int = PRIME) -> bytes:
    """The secret (``length`` bytes) from at least ``t`` shares ``{x: y}``.

    Uses the first ``t`` points (by x). Fewer than ``t`` raise ``ValueError``: they fix
    nothing about the secret.
    """
    if len(shares) < t:
        raise ValueError(f"shamir: {len(shares)} share(s) < threshold {t}: the secret is "
                         "undetermined")
    points = sorted(shares.items())[:t]
    xs = [x % prime for x, _ in points]
    if len(set(xs)) != len(xs) or 0 in xs:
        raise ValueError(f"shamir: share indices must be distinct and non-zero, got "
                         f"{[x for x, _ in points]}")
    value = 0
    for j, (xj, yj) in enumerate(points):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (-xm) % prime
                den = den * (xj - xm) % prime
        value = (value + yj * num * pow(den, -1, prime)) % prime
    if value >= 1 << (8 * length):
        raise ValueError(f"shamir: the shares do not interpolate to a {length}-byte secret "
                         "(shares of different secrets, or corrupted)")
    return value.to_bytes(length, "big")


def share_bytes(y: int) -> bytes:
    """A share's value as :data:`SHARE_BYTES` big-endian bytes."""
    return int(y).to_bytes(SHARE_BYTES, "big")


def share_value(data: bytes) -> int:
    """Inverse of :func:`share_bytes`."""
    if len(data) != SHARE_BYTES:
        raise ValueError(f"shamir: a share is {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ValueError("shamir: share value beyond the field")
    return value
