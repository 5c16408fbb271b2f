"""Make the CKKS key files of a federation: ``python -m mer.privacy.keys --out keys/``.

Writes ``ckks-secret.ctx`` (the CKKS context with its secret key: give a copy to every lab,
over a channel the server does not see, and point the lab's config at it with
``privacy.secret_context=PATH``) and ``ckks-public.ctx`` (no secret key: the server's, with
``privacy.public_context=PATH``). The parameters are those of ``conf/privacy/ckks.yaml``
unless given here; they are checked against the rules of ``privacy.*`` in the config check
and SEAL's 128-bit security limits before anything is written. Key files already in ``--out``
are kept unless ``--force`` (new keys lock out every lab that holds the old secret file).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mer.config_rules import problem_text
from mer.privacy.checks import CKKS_RULES, DEGREES
from mer.privacy.encrypted import PUBLIC_FILE, SECRET_FILE, CKKSParams, write_key_files

# SEAL's largest total coefficient modulus (bits) per ring dimension at 128-bit security
# (HomomorphicEncryption.org standard; seal::CoeffModulus::MaxBitCount)
MAX_COEFF_BITS = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


def parameter_problems(params: CKKSParams) -> list[str]:
    """What is wrong with ``params`` for a key pair (empty: fine), in command-line terms."""
    bits, n, scale = list(params.coeff_mod_bit_sizes), params.poly_modulus_degree, \
        params.scale_bits
    flags = {"privacy.coeff_mod_bit_sizes": ("--coeff-mod-bit-sizes", bits),
             "privacy.scale_bits": ("--scale-bits", scale)}
    problems = [problem_text(r.key, flags[r.key][1], r.check, r.note).split("; e.g.")[0]
                .replace(r.key, flags[r.key][0])
                for r in CKKS_RULES if r.key in flags and not r.check.ok(flags[r.key][1])]
    if problems:
        return problems
    if sum(bits) > MAX_COEFF_BITS[n]:
        problems.append(f"--coeff-mod-bit-sizes {' '.join(map(str, bits))} total {sum(bits)} "
                        f"bits, more than the {MAX_COEFF_BITS[n]} that --poly-modulus-degree "
                        f"{n} allows at 128-bit security: use fewer or smaller primes, or a "
                        "larger degree")
    if sum(bits[:-1]) < scale + 2:
        problems.append(f"--scale-bits {scale} leaves no room in the data primes {bits[:-1]} "
                        "(the last of --coeff-mod-bit-sizes is the special prime; |sum| < "
                        "2^(data bits - scale bits - 1)): lower --scale-bits or add a data prime")
    return problems


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mer.privacy.keys",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for the two files")
    defaults = CKKSParams()
    p.add_argument("--poly-modulus-degree", type=int, choices=DEGREES,
                   default=defaults.poly_modulus_degree, metavar="N",
                   help=f"ring dimension, one of {', '.join(map(str, DEGREES))} "
                        f"(default {defaults.poly_modulus_degree})")
    p.add_argument("--coeff-mod-bit-sizes", type=int, nargs="+",
                   default=defaults.coeff_mod_bit_sizes)
    p.add_argument("--scale-bits", type=int, default=defaults.scale_bits)
    p.add_argument("--force", action="store_true",
                   help="replace key files already in --out")
    args = p.parse_args(argv)
    out: Path = args.out
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file, not a folder: give a folder for {SECRET_FILE} and "
                f"{PUBLIC_FILE}")
    existing = [out / f for f in (SECRET_FILE, PUBLIC_FILE) if (out / f).exists()]
    if existing and not args.force:
        p.error(f"--out already holds {', '.join(map(str, existing))}: new keys would lock out "
                "every lab holding the old secret file. Use another folder, or --force to "
                "replace them")
    params = CKKSParams(poly_modulus_degree=args.poly_modulus_degree,
                        coeff_mod_bit_sizes=list(args.coeff_mod_bit_sizes),
                        scale_bits=args.scale_bits)
    problems = parameter_problems(params)
    if problems:
        p.error("; ".join(problems))
    try:
        secret, public = write_key_files(params, out)
    except OSError as e:
        from mer.data.io import describe_write_error

        err = describe_write_error(getattr(e, "filename", None) or out / SECRET_FILE, e)
        raise (err or e) from e
    print(f"labs (keep private):  privacy.secret_context={secret.resolve()}")
    print(f"server:               privacy.public_context={public.resolve()}")


if __name__ == "__main__":
    from mer.cli import user_errors_exit

    user_errors_exit(main)()
