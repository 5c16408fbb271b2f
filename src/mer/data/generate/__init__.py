"""Driven face generation (thin-plate-spline motion fused from several driving sequences),
augmentation of a fold's training set, and de-identification (a lab's clips re-rendered onto
another identity, the motion kept).

- :mod:`~mer.data.generate.tps`: kornia TPS warps by displacements at control points;
- :mod:`~mer.data.generate.align`: similarity alignment of neutral faces (source geometry kept);
- :mod:`~mer.data.generate.motion`: a driving clip's motion and the fusion of several;
- :mod:`~mer.data.generate.render`, :mod:`~mer.data.generate.generator`: rendering, caching;
- :mod:`~mer.data.generate.augment`: ``data.augment.generate=K`` per fold;
- :mod:`~mer.data.generate.deidentify`, :mod:`~mer.data.generate.identity`: re-rendering onto
  other faces and the LBPH identity classifier that measures what identity is left;
- :mod:`~mer.data.generate.fidelity`: end-point error of a driven sequence's flow against the
  fused (true, on SynME) driving motion.

Imports nothing from engine, models or federated (layering: data is the bottom layer).
"""

from mer.data.generate.errors import GenerationError

__all__ = ["GenerationError"]
