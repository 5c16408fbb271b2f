"""Action-unit strings as databases write them, parsed to AU numbers and multi-hot vectors.

Real sheets write AUs as ``4+7``, ``R12`` / ``L1+2`` / ``A1+2`` / ``T18`` / ``B4`` (side or
position prefixes), ``4,7``, ``12(k)`` (static AU, 4DME), intensity letters ``7B``, ``4A/B``,
``L12C``, ``ref(24)``, plain integers (``12`` or ``12.0`` read by pandas), ``?`` and free text
(``soft focus``). The raw string is always kept; tokens that are not AUs are reported, never
silently dropped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

# The 12 AUs of FED-PsyAU's graph, in node order.
PSYAU_AUS: tuple[int, ...] = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17)

# Pieces are separated by + , ; & and the words "or"/"and" ("R12 or R14": the coder's
# alternatives; both AUs are kept). A "/" separates pieces too, except in intensity ranges.
_SPLIT = re.compile(r"[+,;&/]|\s+(?:or|and)\s+", re.I)
# optional side/position prefix, the AU number, optional intensity letters, optional "(k)"-like tag
_TOKEN = re.compile(r"^(?:[LRABT]|AU)?(\d{1,2})(?:[A-E](?:/[A-E])?)?(?:\([A-Za-z]+\))?$", re.I)
_REF = re.compile(r"^ref\((.+)\)$", re.I)  # ref(24), ref(7B), ref(L10): a reference AU
_INTENSITY_SLASH = re.compile(r"(\d)([A-E])/([A-E])", re.I)
_SIDE_ONLY = re.compile(r"^[LRAB]$", re.I)  # "A/L12": both side letters before one AU


@dataclass
class ParsedAUs:
    """Result of parsing one AU string: the AUs found, in order, and the tokens not understood."""

    raw: str
    aus: tuple[int, ...]
    unknown: tuple[str, ...] = field(default=())


def parse_au_string(value: object) -> ParsedAUs:
    """Parse one AU cell. ``value`` may be a string, an int, a float (pandas) or missing.

    >>> parse_au_string("L1+2+R12B").aus
    (1, 2, 12)
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ParsedAUs("", ())
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer()):
        return ParsedAUs(str(int(value)), (int(value),))
    raw = str(value).strip()
    # "4A/B" -> "4A": that slash is not a separator
    text = _INTENSITY_SLASH.sub(r"\1\2", raw)
    aus: list[int] = []
    unknown: list[str] = []
    for piece in _SPLIT.split(text):
        piece = piece.strip().strip("'\"").rstrip(".")
        if piece.startswith("(") and piece.count("(") > piece.count(")"):
            piece = piece[1:]  # "(R6 or R12)" was split inside its brackets
        if piece.endswith(")") and piece.count(")") > piece.count("("):
            piece = piece[:-1]
        if not piece or _SIDE_ONLY.match(piece):
            continue
        found = _piece_aus(piece)
        if found is None:
            unknown.append(piece)
        else:
            aus += [au for au in found if au not in aus]
    return ParsedAUs(raw, tuple(aus), tuple(unknown))


def _piece_aus(piece: str) -> list[int] | None:
    """AUs of one piece ("R12B", "ref(7B)", "12 25"), or None if it is not AU notation."""
    m = _REF.match(piece)
    if m:
        return _piece_aus(m.group(1).strip())
    tokens = piece.split()
    matches = [_TOKEN.match(t) for t in tokens]
    if tokens and all(matches):
        return [int(m.group(1)) for m in matches]
    return None


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
