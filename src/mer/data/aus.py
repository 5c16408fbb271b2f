"""Action-unit strings as databases write them, parsed to AU numbers and multi-hot vectors.

Real sheets write AUs as ``4+7``, ``R12`` / ``L1+2`` / ``A1+2`` / ``T18`` / ``B4`` (side or
position prefixes), ``4,7``, ``12(k)`` (static AU, 4DME), intensity letters ``7B``, ``4A/B``,
``L12C``, ``ref(24)``, plain integers (``12`` or ``12.0`` read by pandas), ``?`` and free text
(``soft focus``). The raw string is always kept; tokens that are not AUs are reported, never
silently dropped.

AU numbers are FACS codes, 1..99 (:data:`AU_RANGE`): FACS (Ekman, Friesen & Hager 2002) numbers
its action units 1-46, head positions 51-58, eye positions 61-69, visibility codes 70-74 and
gross behaviours 40, 50, 80-98; 0 (neutral face) is no action. A number outside that range
(``-4``, ``1000``, ``AU100``), a fraction (``4.5``) or a boolean cell is *invalid*: kept out of
``aus`` and listed in :attr:`ParsedAUs.invalid`, which the readers turn into an error naming the
sheet row.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

# FACS codes (module docstring): numbers outside this range are not AUs.
AU_RANGE = range(1, 100)

# The 12 AUs of FED-PsyAU's graph, in node order.
PSYAU_AUS: tuple[int, ...] = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17)

# Pieces are separated by + , ; & and the words "or"/"and" ("R12 or R14": the coder's
# alternatives; both AUs are kept). A "/" separates pieces too, except in intensity ranges.
_SPLIT = re.compile(r"[+,;&/]|\s+(?:or|and)\s+", re.I)
# optional side/position prefix, the AU number, optional intensity letters, optional "(k)"-like tag
_TOKEN = re.compile(r"^(?:[LRABT]|AU)?([0-9]+)(?:[A-E](?:/[A-E])?)?(?:\([A-Za-z]+\))?$", re.I)
# a number written as text ("-4", "4.5", "12.0"): an AU when it is a whole number in AU_RANGE
_NUMBER = re.compile(r"^[+-]?[0-9]+(?:\.[0-9]*)?$")
_REF = re.compile(r"^ref\((.+)\)$", re.I)  # ref(24), ref(7B), ref(L10): a reference AU
_INTENSITY_SLASH = re.compile(r"([0-9])([A-E])/([A-E])", re.I)
_SIDE_ONLY = re.compile(r"^[LRAB]$", re.I)  # "A/L12": both side letters before one AU


@dataclass
class ParsedAUs:
    """Result of parsing one AU cell.

    ``aus``: the AU numbers found, in order, each in :data:`AU_RANGE`; ``unknown``: tokens that
    are not AU notation (``soft focus``, ``?``); ``invalid``: numbers written as AUs that are no
    FACS code (``-4``, ``1000``, ``4.5``; ``AU100`` is listed as ``100``).
    """

    raw: str
    aus: tuple[int, ...]
    unknown: tuple[str, ...] = field(default=())
    invalid: tuple[str, ...] = field(default=())


def parse_au_string(value: object) -> ParsedAUs:
    """Parse one AU cell. ``value`` may be a string, an int, a float (pandas) or missing.

    >>> parse_au_string("L1+2+R12B").aus
    (1, 2, 12)
    >>> parse_au_string(-4).invalid
    ('-4',)
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ParsedAUs("", ())
    if isinstance(value, (bool, np.bool_)):  # an Excel TRUE is not AU 1
        return ParsedAUs(str(value), (), (), (str(value),))
    if isinstance(value, (int, float, np.integer, np.floating)):
        number = float(value)
        text = str(int(value)) if math.isfinite(number) and number.is_integer() else str(value)
        au = _au_number(text)
        return ParsedAUs(text, (au,)) if au is not None else ParsedAUs(text, (), (), (text,))
    raw = str(value).strip()
    # "4A/B" -> "4A": that slash is not a separator
    text = _INTENSITY_SLASH.sub(r"\1\2", raw)
    aus: list[int] = []
    unknown: list[str] = []
    invalid: list[str] = []
    for piece in _SPLIT.split(text):
        piece = piece.strip().strip("'\"").rstrip(".")
        if piece.startswith("(") and piece.count("(") > piece.count(")"):
            piece = piece[1:]  # "(R6 or R12)" was split inside its brackets
        if piece.endswith(")") and piece.count(")") > piece.count("("):
            piece = piece[:-1]
        if not piece or _SIDE_ONLY.match(piece):
            continue
        found = _piece_numbers(piece)
        if found is None:
            unknown.append(piece)
            continue
        for number in found:
            au = _au_number(number)
            if au is None:
                invalid.append(number)
            elif au not in aus:
                aus.append(au)
    return ParsedAUs(raw, tuple(aus), tuple(unknown), tuple(invalid))


def _au_number(text: str) -> int | None:
    """The AU of a number written as text ("12", "012", "12.0"), None unless in AU_RANGE."""
    if not _NUMBER.match(text) or len(text) > 12:  # 12 characters: no int() of 5000 digits
        return None
    number = float(text)
    return int(number) if number.is_integer() and int(number) in AU_RANGE else None


def _piece_numbers(piece: str) -> list[str] | None:
    """AU numbers of one piece ("R12B", "ref(7B)", "12 25", "-4") as written, or None if it is
    not AU notation."""
    m = _REF.match(piece)
    if m:
        return _piece_numbers(m.group(1).strip())
    tokens = piece.split()
    if not tokens:
        return None
    numbers = []
    for t in tokens:
        m = _TOKEN.match(t)
        if m is None and not _NUMBER.match(t):
            return None
        numbers.append(m.group(1) if m else t)
    return numbers


def multi_hot(
    aus: tuple[int, ...] | list[int], au_list: tuple[int, ...] = PSYAU_AUS
) -> np.ndarray:
    """(len(au_list),) float32, 1 where the AU is present; AUs outside the list are ignored."""
    index = {au: i for i, au in enumerate(au_list)}
    v = np.zeros(len(au_list), dtype=np.float32)
    for au in aus:
        if au in index:
            v[index[au]] = 1.0
    return v
