"""Emotion classes of spotted intervals (for recognition after spotting, STRS).

Long-video sheets write emotions in their own words (CAS(ME)^2: negative, positive, surprise,
others; SAMM-LV has none unless SAMM's micro sheet is given). Recognition uses the MEGC
composite classes (negative, positive, surprise) by default; an interval whose emotion has no
class (``others``, blank) is not recognised, and is listed with that reason.
"""

from __future__ import annotations

from mer.data.labels import _COMPOSITE_MAP, COMPOSITE_CLASSES

CLASSES = list(COMPOSITE_CLASSES)


def emotion_class(emotion: object, classes: list[str] | None = None) -> str | None:
    """The class of an emotion word, or None (no class: excluded from recognition)."""
    classes = classes or CLASSES
    word = str(emotion or "").strip().lower()
    if word in classes:
        return word
    mapped = _COMPOSITE_MAP.get(word)
    return mapped if mapped in classes else None
