"""Config rules of the privacy layer's own parameters: CKKS (shared by the config check,
``privacy.*``, and the key generator's command line, ``python -m mer.privacy.keys``, which must
not import the whole config check: it reaches every package) and DP-SGD's per-sample
gradient mode (here so that the config check needs no Opacus import)."""

from __future__ import annotations

from mer.config_rules import Int, ListOf, OneOf, Rule

DEGREES = (1024, 2048, 4096, 8192, 16384, 32768)

CKKS_RULES = (
    Rule("privacy.poly_modulus_degree", OneOf(choices=DEGREES), "CKKS ring dimension"),
    Rule("privacy.coeff_mod_bit_sizes", ListOf(item=Int(1, 60), min_len=2)),
    Rule("privacy.scale_bits", Int(1, 60)),
)

# how DP-SGD gets per-sample gradients (mer.privacy.dp.resolve_grad_sample): every recogniser
# mer has trains under one of them, so no model is refused here
GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch")

DP_RULES = (
    Rule("privacy.grad_sample", OneOf(choices=GRAD_SAMPLE_MODES),
         "per-sample gradients: Opacus' hooks where exact (auto), or torch.func"),
)
