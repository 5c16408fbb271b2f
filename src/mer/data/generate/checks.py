"""Config rules of driven generation (``data.augment``, ``generate_augment``, ``deidentify``),
joined to ``mer.config_check.RULES`` so that ``mer.run`` checks them before any work."""

from __future__ import annotations

from mer.config_rules import POS_INT, Bool, Int, ListOf, Num, OneOf, Prob, Rule, Text

# data configs inside other keys (as mer.config_check.DATA_ELSEWHERE: a pretraining set)
DATA_ELSEWHERE = ("model.pretrain.data",)
ODD = "odd, >= 3: onset, apex in the middle, offset"

_DATA: tuple[Rule, ...] = (
    Rule("data.augment.generate", Int(0),
         "generated sequences per training clip of each fold; 0: none"),
    Rule("data.augment.drivers", Int(1), "driving clips of the same class fused per sequence"),
    Rule("data.augment.phases", Int(3), f"knots of normalised time ({ODD})"),
    Rule("data.augment.frames", Int(3), f"frames per generated clip ({ODD})"),
    Rule("data.augment.fusion", OneOf(choices=("median", "mean"))),
    Rule("data.augment.motion", OneOf(choices=("tps", "dense")),
         "tps: the drivers' flow at control points, densified by a TPS; dense: their whole flow "
         "field carried pixel by pixel"),
)
RULES: tuple[Rule, ...] = _DATA + tuple(  # a data config elsewhere (a pretraining set): same
    Rule(f"{where}.{r.key[len('data.'):]}", r.check, r.note)
    for where in DATA_ELSEWHERE for r in _DATA) + (
    Rule("generate_augment.generate", Int(1), "K of the augmented arm (the baseline has 0)"),
    Rule("generate_augment.motion_check.samples", Int(0),
         "driven sequences whose flow is compared with the fused true motion (SynME)"),
    Rule("generate_augment.motion_check.drivers", Int(1)),
    Rule("deidentify.identities.preset", Text(), "the SynME preset whose faces are the new "
         "identities"),
    Rule("deidentify.identities.seed", Int(0), "a seed other than data.seed: other people"),
    Rule("deidentify.face", Text(null=True), "a face image (landmarks found by the detector)"),
    Rule("deidentify.frames", Int(3), f"frames per re-rendered clip ({ODD})"),
    Rule("deidentify.phases", Int(3), ODD),
    Rule("deidentify.identity.size", Int(16), "side of the face images of the identity "
         "classifier"),
    Rule("deidentify.identity.train_fraction", Prob(open_lo=True, open_hi=True, eg=0.5),
         "share of each subject's clips the identity classifier trains on"),
    Rule("deidentify.identity.radius", POS_INT, "LBPH radius"),
    Rule("deidentify.margin", Num(lo=0, eg=0.1), "allowed UF1 drop on de-identified clips"),
    Rule("deidentify.controls", ListOf(item=OneOf(choices=("own_face",))),
         "control arms: own_face re-renders each clip on its own face (identity kept)"),
    Rule("deidentify.recipient", Bool(),
         "also train and test the recogniser on the de-identified clips alone (a recipient)"),
    Rule("deidentify.density", Int(1), "control points per landmark triangle: 1 the centroid, "
         "L the L(L+1)/2 inner points of its L-fold subdivision"),
    Rule("deidentify.motion", OneOf(choices=("tps", "dense")),
         "how a clip's motion is carried to the new face (as data.augment.motion)"),
    Rule("deidentify.compare_motion", OneOf(choices=("tps", "dense"), null=True),
         "also test the re-rendered arms with this motion model (null: no)"),
    Rule("deidentify.compare_density", Int(1, null=True),
         "also test the re-rendered arms at this density (null: no)"),
)

# Runs that load data but never call the augmentation hook (mer.run's dispatch order): there
# data.augment.generate would be ignored, so it is refused before any work.
_NOT_AUGMENTED = (
    ("dp_curve", "+experiment=dp_curve"), ("fed_spot", "+experiment=fed_spot"),
    ("spotters", "spotting"), ("spotting", "spotting"),
    ("sticker_audit", "+experiment=sticker_audit"),
    ("generate_augment", "+experiment=generate_augment"),
    ("deidentify", "+experiment=deidentify"), ("audit", "the privacy audit"),
)


def augment_problems(tree: dict) -> list[str]:
    """``data.augment.generate=K`` (K > 0) where it would be silently ignored: only recognition
    protocols (loso, cross_db, lodo) and federated runs (``federated.protocol`` holdout or
    loso, each lab augmenting its own training split) generate sequences."""
    k = ((tree.get("data") or {}).get("augment") or {}).get("generate")
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        return []
    for key, what in _NOT_AUGMENTED:
        if tree.get(key):
            fix = ("set generate_augment.generate=K (its augmented arm) and leave "
                   "data.augment.generate out") if key == "generate_augment" else (
                "remove data.augment.generate (or run a recognition protocol or a federated "
                "run with it)")
            return [f"data.augment.generate={k}: {what} does not add generated sequences (only "
                    "recognition protocols loso/cross_db/lodo and federated runs do), so it "
                    f"would be ignored; {fix}"]
    return []


def refuse_for_flower(cfg) -> None:
    """ConfigError for ``data.augment.generate`` > 0 in the Flower apps: a SuperNode does not
    augment its lab's training split yet (the in-process run, ``python -m mer.run``, does)."""
    from mer.config_rules import ConfigError

    aug = (cfg.get("data") or {}).get("augment") or {}
    k = aug.get("generate") if hasattr(aug, "get") else None
    if isinstance(k, int) and not isinstance(k, bool) and k > 0:
        raise ConfigError([
            f"data.augment.generate={k}: the Flower apps (SuperNodes) do not augment a lab's "
            "training clips, so it would be ignored; run the federation in-process with "
            "`python -m mer.run ... data.augment.generate=K` (each lab augmented inside "
            "itself), or drop data.augment.generate"])
