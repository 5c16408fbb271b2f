"""Post-hoc adversarial stickers against micro-expression recognition (Tan et al., ICASSP
2025): stickers pasted on a clip's frames before the flow, placed where causal discovery over
facial sites finds the recogniser's output depends on, in a black-box setting with a single
query per clip. Primitives only; ``mer.experiments.sticker_audit`` composes them.

- :mod:`.styles`: shapes, colours, sub-pixel rendering and pasting;
- :mod:`.placement`: sites, face geometry, checks (:class:`StickerError`), following the face;
- :mod:`.features`: per-site motion of a clip (what the attacker measures);
- :mod:`.causal`: PC / FCI (causal-learn) ranking of sites;
- :mod:`.attack`: the black-box recogniser with a query budget;
- :mod:`.pipeline`: stickered frames through mer's flow pipeline.
"""

from mer.privacy.stickers.attack import BlackBox, QueryBudgetError
from mer.privacy.stickers.causal import CausalDiscoveryError, CausalRanking, causal_ranking
from mer.privacy.stickers.placement import SITES, Sticker, StickerError, check_sticker
from mer.privacy.stickers.styles import SHAPES, StickerStyle

__all__ = ["SHAPES", "SITES", "BlackBox", "CausalDiscoveryError", "CausalRanking",
           "QueryBudgetError", "Sticker", "StickerError", "StickerStyle", "causal_ranking",
           "check_sticker"]
