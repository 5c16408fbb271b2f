"""Config rules of the sticker audit (``sticker_audit.*``), joined to
``mer.config_check.RULES`` so that ``mer.run`` checks them before any work."""

from __future__ import annotations

from mer.config_rules import (
    POS_INT,
    SIZE,
    Bool,
    Int,
    ListOf,
    Mapping,
    Num,
    OneOf,
    Prob,
    Rule,
    Text,
)


def _models() -> list[str]:
    from mer.models.registry import list_models

    return list_models()


def _shapes() -> list[str]:
    from mer.privacy.stickers.styles import SHAPES

    return list(SHAPES)


P = "sticker_audit"
RULES: tuple[Rule, ...] = (
    Rule(f"{P}.split.test", Prob(open_lo=True, open_hi=True, eg=0.3),
         "share of each database's subjects protected (attacked)"),
    Rule(f"{P}.split.reference", Prob(open_lo=True, open_hi=True, eg=0.25),
         "share of each database's subjects the attacker holds for causal discovery"),
    Rule(f"{P}.recognisers", ListOf(item=Mapping(), min_len=1)),
    Rule(f"{P}.recognisers.*.name", OneOf(choices=_models)),
    Rule(f"{P}.recognisers.*.epochs", Int(1, null=True), "overrides trainer.max_epochs"),
    Rule(f"{P}.recognisers.*.lr", Num(lo=0, open_lo=True, eg=1e-3)),
    Rule(f"{P}.recognisers.*.kwargs.dim", SIZE),
    Rule(f"{P}.recognisers.*.kwargs.block_repeats", ListOf(item=POS_INT, min_len=1)),
    Rule(f"{P}.styles", ListOf(item=Mapping(), min_len=1)),
    Rule(f"{P}.styles.*.name", Text()),
    Rule(f"{P}.styles.*.shape", OneOf(choices=_shapes)),
    Rule(f"{P}.styles.*.colour", ListOf(item=Int(0, 255), min_len=3), "(B, G, R) 0-255"),
    Rule(f"{P}.styles.*.aspect", Num(lo=0, open_lo=True, eg=1.6), "width / height"),
    Rule(f"{P}.styles.*.inner", Prob(open_lo=True, open_hi=True, eg=0.45),
         "a star's inner radius / outer radius"),
    Rule(f"{P}.styles.*.angle", Num(eg=0), "degrees"),
    Rule(f"{P}.areas", ListOf(item=Prob(open_lo=True, eg=0.05), min_len=1),
         "sticker area as a fraction of the face area; > 1 would be larger than the face"),
    Rule(f"{P}.placements", ListOf(item=OneOf(choices=("causal", "random", "max_motion")),
                                   min_len=1)),
    Rule(f"{P}.causal.method", OneOf(choices=("pc", "fci"))),
    Rule(f"{P}.causal.alpha", Prob(open_lo=True, open_hi=True, eg=0.05),
         "significance level of the independence tests"),
    Rule(f"{P}.causal.depth", Int(0, null=True),
         "largest conditioning set of the tests; null: all the other sites"),
    Rule(f"{P}.features.flow", OneOf(choices=("tvl1", "farneback", "dis"))),
    Rule(f"{P}.features.disc_fraction", Prob(open_lo=True, eg=0.04),
         "area of the disc around a site, a fraction of the face area"),
    Rule(f"{P}.track", Bool()),
    Rule(f"{P}.workers", Int(0), "flow worker processes; 0: in this process"),
    Rule(f"{P}.bootstrap", POS_INT),
    Rule(f"{P}.figure_clips", POS_INT),
)
