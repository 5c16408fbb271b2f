"""Label schemes: how a database's own emotion words become class indices.

Each scheme maps (family, emotion) -> class name, or ``None`` for a sample excluded on purpose,
with the reason. ``family`` is the kind of database a table comes from (``casme2``, ``samm``,
``smic``, ...); SynME databases declare the family they imitate.

Schemes:
- ``composite``: MEGC2019 composite, 3 classes. positive = happiness; surprise = surprise;
  negative = anger, contempt, disgust, fear, sadness (SAMM) and disgust, repression (CASME II);
  SMIC labels as they are. Standard exclusions: CASME II fear, sadness and others (too few
  samples, or no emotion), SAMM Other, and two CASME II clips (``COMPOSITE_EXCLUDED_CLIPS``).
  Gives 88/32/25 (CASME II), 92/26/15 (SAMM), 70/51/43 (SMIC-HS) negative/positive/surprise.
  Other databases get the same mapping (CAS(ME)^3 writes happy/sad; their "others" and
  samples with several emotions are left out), which is not part of MEGC2019.
- ``casme2_5class``: happiness, disgust, surprise, repression, others (CASME II's usual 5).
- ``emotion``: the database's own emotion words, classes sorted alphabetically (a blank
  emotion is excluded, not a class).
- ``objective``: objective classes I-VII: the sheet's own (SAMM, CAS(ME)^3: ``objective``
  column), else from the AU combination.
- ``objective5``: objective classes I-V only (VI and VII excluded, with the reason): the 5
  classes of the MEGC2018 cross-database setting (CASME II and SAMM pooled).
- a ``dict`` given in config: ``{emotion: class}`` (keys compared in lower case); emotions
  absent from it, or mapped to null, are excluded with that reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from mer.registry import Registry

COMPOSITE_CLASSES = ["negative", "positive", "surprise"]
_COMPOSITE_MAP = {
    "happiness": "positive", "positive": "positive", "happy": "positive",
    "surprise": "surprise",
    "negative": "negative", "anger": "negative", "contempt": "negative", "disgust": "negative",
    "fear": "negative", "sadness": "negative", "sad": "negative", "repression": "negative",
}
# Emotions the MEGC2019 composite leaves out, per database family ("others"/"other" are left
# out for every family: no emotion).
COMPOSITE_EXCLUSIONS: dict[str, set[str]] = {
    "casme2": {"fear", "sadness", "others"},
    "samm": {"other"},
}
# Single CASME II clips the MEGC2019 composite leaves out although their emotion maps (disgust:
# 90 negative in the sheet, 88 in the composite). The rule: a clip without a usable apex
# annotation in CASME2-coding-20140508.xlsx is not in the composite.
#   sub04/EP12_01f: ApexFrame is "/" (not annotated).
#   sub05/EP09_05f: ApexFrame equals OnsetFrame (no onset -> apex motion).
# (Re-saved sheets may carry a filled-in apex, the midpoint, for both.) Source: the composite
# lists distributed with the MEGC2019 baselines (e.g. combined_3_class2_for_optical_flow.csv,
# 145 CASME II samples, of STSTNet and HTNet) hold every CASME II disgust/repression/
# happiness/surprise clip but these two; public MER code drops them for those two reasons.
# Keyed by family; SynME clip names never end in "f", so they cannot collide.
COMPOSITE_EXCLUDED_CLIPS: dict[tuple[str, str, str], str] = {
    ("casme2", "sub04", "EP12_01f"): "apex not annotated ('/') in CASME2-coding-20140508",
    ("casme2", "sub05", "EP09_05f"): "apex equals onset in CASME2-coding-20140508",
}
CASME2_5CLASS = ["disgust", "happiness", "others", "repression", "surprise"]

# Objective classes by AU combination (mer-facts §3), tested in order I..VI, else VII.
OBJECTIVE_CLASSES = ["I", "II", "III", "IV", "V", "VI", "VII"]
OBJECTIVE5_CLASSES = OBJECTIVE_CLASSES[:5]  # MEGC2018 cross-database: I..V
_OBJECTIVE_COMBOS: dict[str, list[frozenset[int]]] = {
    "I": [frozenset(s) for s in ({6}, {12}, {6, 12}, {6, 7, 12}, {7, 12})],
    "II": [frozenset(s) for s in ({1, 2}, {5}, {25}, {1, 2, 25}, {25, 26}, {5, 24})],
    "III": [frozenset(s) for s in ({23}, {4}, {4, 7}, {4, 5}, {4, 5, 7}, {17, 24}, {4, 6, 7},
                                   {4, 38})],
    "IV": [frozenset(s) for s in ({10}, {9}, {4, 9}, {4, 40}, {4, 5, 40}, {4, 7, 9}, {4, 9, 17},
                                  {4, 7, 10}, {4, 5, 7, 9}, {7, 10})],
    "V": [frozenset(s) for s in ({1}, {15}, {1, 4}, {6, 15}, {15, 17})],
    "VI": [frozenset(s) for s in ({1, 2, 4}, {20})],
}


class LabelError(ValueError):
    """An emotion the chosen scheme does not know."""


def objective_class(aus: tuple[int, ...]) -> str:
    """Objective class (I..VII) of an AU combination: exact match of the AU set, else VII."""
    s = frozenset(aus)
    for name, combos in _OBJECTIVE_COMBOS.items():
        if s in combos:
            return name
    return "VII"


def _emotion(value: object) -> str:
    """An emotion cell as compared by the schemes: stripped, lower case; '' when blank."""
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) \
        else str(value).strip().lower()


def _mapping(scheme: Mapping[str, str]) -> dict[str, str]:
    """``{emotion: class}`` with the emotions as :func:`_emotion` writes them (``Happiness``
    and ``happiness`` are one key); LabelError when two keys become one with two classes."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for key, value in scheme.items():
        k = _emotion(key)
        if k in out and out[k] != value:
            raise LabelError(f"label mapping keys '{seen[k]}' and '{key}' both map '{k}' "
                             f"(to '{out[k]}' and '{value}'; emotions are compared in lower "
                             "case): keep one")
        out[k], seen[k] = value, str(key)
    return out


def _composite(family: str, emotion: str, subject: str, clip: str) -> tuple[str | None, str]:
    if emotion in COMPOSITE_EXCLUSIONS.get(family, set()) or emotion in ("others", "other"):
        return None, f"MEGC2019 composite excludes '{emotion}' for {family}"
    if (family, subject, clip) in COMPOSITE_EXCLUDED_CLIPS:
        why = COMPOSITE_EXCLUDED_CLIPS[family, subject, clip]
        return None, f"MEGC2019 composite excludes {family} {subject}/{clip}: {why}"
    if "+" in emotion and all(e in _COMPOSITE_MAP for e in emotion.split("+")):
        return None, f"composite scheme: several emotions ('{emotion}')"
    if emotion not in _COMPOSITE_MAP:
        raise LabelError(f"composite scheme: unknown emotion '{emotion}'")
    return _COMPOSITE_MAP[emotion], ""


@dataclass(frozen=True)
class LabelScheme:
    """A named scheme: ``classes(table)`` -> the class names (in label order) and
    ``label(family, emotion, row)`` -> ``(class name or None, why it is None)``; ``row`` is
    the sample's table row (``subject``, ``clip``, ``aus``, ``objective``...). A bad cell
    raises :class:`LabelError` (the caller adds the database and row)."""

    classes: Callable[[pd.DataFrame], list[str]]
    label: Callable[[str, str, Any], tuple[str | None, str]]


LABEL_SCHEMES: Registry[LabelScheme] = Registry(
    "label scheme", hint="data.label_scheme, or a mapping {emotion: class}", error=LabelError)


def label_scheme(name: str, classes: list[str] | Callable[[pd.DataFrame], list[str]]):
    """Decorator registering ``label(family, emotion, row)`` as scheme ``name`` with fixed
    ``classes`` (a list) or classes read from the table (a function)."""
    of_table = classes if callable(classes) else (lambda _table: list(classes))

    def add(label: Callable[[str, str, Any], tuple[str | None, str]]):
        LABEL_SCHEMES.register(name, LabelScheme(of_table, label))
        return label

    return add


@label_scheme("composite", COMPOSITE_CLASSES)
def _composite_label(family: str, emotion: str, r: Any) -> tuple[str | None, str]:
    return _composite(family, emotion, str(r.subject), str(r.clip))


@label_scheme("casme2_5class", CASME2_5CLASS)
def _casme2_5class(family: str, emotion: str, r: Any) -> tuple[str | None, str]:
    name = emotion if emotion in CASME2_5CLASS else None
    return name, "" if name else f"'{emotion}' is not one of the CASME II 5 classes"


def _objective_of(r: Any) -> tuple[str, str]:
    """(class I..VII, its source in words): the sheet's own, else from the AU combination."""
    own = getattr(r, "objective", "")
    own = "" if pd.isna(own) else str(own).strip().upper()
    if own and own not in OBJECTIVE_CLASSES:
        raise LabelError(f"objective class '{own}' is not one of I..VII")
    if own:
        return own, "the sheet's objective class"
    return objective_class(tuple(r.aus)), \
        f"the objective class of AUs {'+'.join(map(str, r.aus)) or 'none'}"


@label_scheme("objective", OBJECTIVE_CLASSES)
def _objective(family: str, emotion: str, r: Any) -> tuple[str | None, str]:
    return _objective_of(r)[0], ""


@label_scheme("objective5", OBJECTIVE5_CLASSES)
def _objective5(family: str, emotion: str, r: Any) -> tuple[str | None, str]:
    name, source = _objective_of(r)
    if name not in OBJECTIVE5_CLASSES:
        return None, (f"{source} is {name}; objective5 keeps I..V (the MEGC2018 "
                      "cross-database classes)")
    return name, ""


def _table_emotions(table: pd.DataFrame) -> list[str]:
    # the words as compared by the schemes; a blank emotion is no class
    return sorted({_emotion(e) for e in table["emotion"]} - {""})


@label_scheme("emotion", _table_emotions)
def _own_emotion(family: str, emotion: str, r: Any) -> tuple[str | None, str]:
    return emotion or None, "" if emotion else f"no emotion in the sheet (row {r.row})"


def _mapping_scheme(scheme: Mapping[str, str]) -> LabelScheme:
    """The scheme of a configured ``{emotion: class}`` mapping (emotions absent from it, or
    mapped to null, are excluded with that reason)."""
    mapping = _mapping(scheme)
    classes = sorted({str(v) for v in mapping.values() if v is not None})

    def label(family: str, emotion: str, r: Any) -> tuple[str | None, str]:
        name = mapping.get(emotion)
        if name is not None:
            return str(name), ""
        return None, (f"emotion '{emotion}' mapped to null in the configured mapping"
                      if emotion in mapping else
                      f"emotion '{emotion}' not in the configured mapping")

    return LabelScheme(lambda _table: classes, label)


def apply_label_scheme(
    table: pd.DataFrame, scheme: str | Mapping[str, str], family: str | Mapping[str, str]
) -> tuple[pd.DataFrame, list[str], list[dict]]:
    """Label a sample table.

    Args:
        table: sample table (see ``mer.data.samples``) with ``database, subject, clip, emotion,
            aus, row``.
        scheme: a scheme name (module docstring; :data:`LABEL_SCHEMES`) or an
            ``{emotion: class}`` mapping.
        family: the database family, or ``{database: family}``.

    Returns:
        (kept rows with an int ``label`` column, class names, excluded samples with reasons).

    Raises:
        LabelError naming the database, row and emotion when an emotion is not in the scheme.
    """
    families = family if isinstance(family, Mapping) else None
    if families is not None:
        missing = sorted(set(table["database"]) - set(families))
        if missing:
            raise LabelError(f"database '{missing[0]}' has no family in {dict(families)}: add "
                             "it (data.families) so that the scheme knows its emotion words")
    rule = _mapping_scheme(scheme) if isinstance(scheme, Mapping) else LABEL_SCHEMES.get(scheme)
    classes = rule.classes(table)
    rows, labels, excluded = [], [], []
    for pos, r in enumerate(table.itertuples(index=False)):
        fam = families[r.database] if families is not None else family
        try:
            name, reason = rule.label(fam, _emotion(r.emotion), r)
        except LabelError as e:
            raise LabelError(
                f"{r.database}, sheet row {r.row} (subject {r.subject}, clip {r.clip}): {e}. "
                "Fix the sheet, or pass a mapping in data.label_scheme."
            ) from None
        if name is None:
            excluded.append({"database": r.database, "subject": r.subject, "clip": r.clip,
                             "reason": reason})
            continue
        rows.append(pos)
        labels.append(classes.index(name))
    kept = table.iloc[rows].copy().reset_index(drop=True)
    kept["label"] = labels
    return kept, list(classes), excluded
