"""Make the CKKS key files of a federation: ``python -m mer.privacy.keys --out keys/``.

Writes ``ckks-secret.ctx`` (the CKKS context with its secret key: give a copy to every lab,
over a channel the server does not see, and point the lab's config at it with
``privacy.secret_context=PATH``) and ``ckks-public.ctx`` (no secret key: the server's, with
``privacy.public_context=PATH``). The parameters are those of ``conf/privacy/ckks.yaml``
unless given here.
"""

from __future__ import annotations

import argparse

from mer.privacy.encrypted import CKKSParams, write_key_files


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the two files")
    defaults = CKKSParams()
    p.add_argument("--poly-modulus-degree", type=int, default=defaults.poly_modulus_degree)
    p.add_argument("--coeff-mod-bit-sizes", type=int, nargs="+",
                   default=defaults.coeff_mod_bit_sizes)
    p.add_argument("--scale-bits", type=int, default=defaults.scale_bits)
    args = p.parse_args(argv)
    params = CKKSParams(poly_modulus_degree=args.poly_modulus_degree,
                        coeff_mod_bit_sizes=list(args.coeff_mod_bit_sizes),
                        scale_bits=args.scale_bits)
    secret, public = write_key_files(params, args.out)
    print(f"labs (keep private):  privacy.secret_context={secret.resolve()}")
    print(f"server:               privacy.public_context={public.resolve()}")


if __name__ == "__main__":
    from mer.cli import user_errors_exit

    user_errors_exit(main)()
