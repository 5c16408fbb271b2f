"""Config rules of the spotting keys (``spotting``, ``spotters.*``, ``fed_spot``, ``strs``,
``spot``), joined to ``mer.config_check.RULES`` so that ``mer.run`` checks them before any
work. Kept here, beside the spotters, so that a new spotter setting is one line here."""

from __future__ import annotations

from mer.config_rules import (
    LR,
    POS_INT,
    SIZE,
    Bool,
    Either,
    Int,
    ListOf,
    Num,
    OneOf,
    Prob,
    Rule,
    Text,
)


def _spotters() -> list[str]:
    from mer.spotting.registry import list_spotters

    return list_spotters()


def _models() -> list[str]:
    from mer.models.registry import list_models

    return list_models()


FRACTION = Prob(open_hi=True, eg=0.25)


def _spotter_rules(prefix: str) -> tuple[Rule, ...]:
    p = prefix
    return (
        Rule(f"{p}.name", OneOf(choices=_spotters)),
        Rule(f"{p}.target_fps", Num(lo=0, open_lo=True, null=True, eg=30),
             "positions per second the spotter works at; null: every frame"),
        Rule(f"{p}.thresholds", ListOf(item=Num(lo=0, eg=0.5), min_len=1, null=True),
             "threshold candidates, chosen on training subjects"),
        Rule(f"{p}.types", ListOf(item=OneOf(choices=("micro", "macro")), min_len=1)),
        Rule(f"{p}.val_subjects", FRACTION, "share of training subjects for the thresholds"),
        Rule(f"{p}.n_directions", Int(2)),
        Rule(f"{p}.top_fraction", Prob(open_lo=True, eg=0.3333)),
        Rule(f"{p}.window", Int(4), "positions per window"),
        Rule(f"{p}.epochs", POS_INT),
        Rule(f"{p}.batch_size", SIZE),
        Rule(f"{p}.lr", LR),
        Rule(f"{p}.weight_decay", Num(lo=0, eg=1e-4)),
        Rule(f"{p}.optimizer", OneOf(choices=("adam", "adamw", "sgd"))),
        Rule(f"{p}.neg_ratio", Num(lo=0, eg=1.0)),
        Rule(f"{p}.pos_weight", Num(lo=0, eg=4.0)),
        Rule(f"{p}.target_width", Num(lo=0, open_lo=True, eg=0.25)),
        Rule(f"{p}.classes", ListOf(item=Text(), min_len=2)),
        Rule(f"{p}.w_spot", Num(lo=0, eg=0.9)),
        Rule(f"{p}.w_rec", Num(lo=0, eg=0.1)),
        Rule(f"{p}.net.hidden", SIZE),
        Rule(f"{p}.net.dilations", ListOf(item=POS_INT, min_len=1)),
        Rule(f"{p}.net.dropout", Prob(open_hi=True, eg=0.1)),
        Rule(f"{p}.net.image_size", Int(8), "side of the crops and flow images"),
        Rule(f"{p}.net.channels", SIZE),
        Rule(f"{p}.net.levels", POS_INT),
        Rule(f"{p}.net.layers", POS_INT),
        Rule(f"{p}.net.heads", POS_INT),
        Rule(f"{p}.net.d_model", SIZE),
        Rule(f"{p}.net.n_layers", POS_INT),
        Rule(f"{p}.net.d_state", SIZE),
    )


RULES: tuple[Rule, ...] = (
    *_spotter_rules("spotting"),
    *_spotter_rules("spotters.*"),
    *_spotter_rules("fed_spot.spotter"),
    Rule("spot.fold_index", Either(options=(Int(0), ListOf(item=Int(0), min_len=1)), null=True)),
    Rule("spot.timelines", Bool()),
    Rule("spot.max_timelines", Int(0, null=True)),
    Rule("spot.threads", Int(1, null=True), "torch threads; null: torch's default"),
    Rule("fed_spot.test_fraction", Prob(open_lo=True, open_hi=True, eg=0.3)),
    Rule("fed_spot.baselines", Bool()),
    Rule("strs.spotter", Text()),
    Rule("strs.recogniser", OneOf(choices=("flow", "me_tst"))),
    Rule("strs.model", OneOf(choices=_models)),
    Rule("strs.classes", ListOf(item=Text(), min_len=2)),
    Rule("strs.epochs", POS_INT),
    Rule("strs.lr", LR),
    Rule("strs.batch_size", SIZE),
    Rule("strs.flow.method", OneOf(choices=("tvl1", "farneback", "dis"))),
    Rule("strs.flow.work_size", Int(8)),
    Rule("strs.flow.out_size", Int(2)),
)
