"""Config rules of the CKKS parameters, shared by the config check (``privacy.*``) and the key
generator's command line (``python -m mer.privacy.keys``), which must not import the whole
config check (it reaches every package)."""

from __future__ import annotations

from mer.config_rules import Int, ListOf, OneOf, Rule

DEGREES = (1024, 2048, 4096, 8192, 16384, 32768)

CKKS_RULES = (
    Rule("privacy.poly_modulus_degree", OneOf(choices=DEGREES), "CKKS ring dimension"),
    Rule("privacy.coeff_mod_bit_sizes", ListOf(item=Int(1, 60), min_len=2)),
    Rule("privacy.scale_bits", Int(1, 60)),
)
