"""The error of driven generation and de-identification: names the clip and the fix."""

from __future__ import annotations


class GenerationError(ValueError):
    """A driven sequence that cannot be made: a driving clip of another class than the target,
    a source face whose landmarks are not found, frames that cannot be read. The message names
    the clip (``database/subject/clip``) or the image, and what would fix it."""
