"""How much identity a face image still gives away: an LBPH face recogniser (OpenCV contrib's
``cv2.face.LBPHFaceRecognizer_create``; no downloaded weights) trained on the original faces
of a set of subjects, then asked who is on other images (held-out originals, or the same clips
de-identified). Accuracy near ``1 / subjects`` (chance) means the identity is gone."""

from __future__ import annotations

import cv2
import numpy as np


def face_image(path: str, size: int) -> np.ndarray:
    """A frame file as a (size, size) grey uint8 image (the whole frame: cropped faces)."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise FileNotFoundError(f"identity classifier: cannot read frame {path}")
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


class IdentityClassifier:
    """LBPH over (S, S) grey faces; labels are subject keys (strings).

    Args:
        radius, neighbors, grid: LBPH settings (OpenCV's defaults 1, 8, 8x8).
    """

    def __init__(self, radius: int = 1, neighbors: int = 8, grid: int = 8) -> None:
        self.model = cv2.face.LBPHFaceRecognizer_create(radius, neighbors, grid, grid)
        self.names: list[str] = []

    def fit(self, images: list[np.ndarray], subjects: list[str]) -> IdentityClassifier:
        """Train on (S, S) uint8 images labelled with their subject keys."""
        self.names = sorted(set(subjects))
        labels = np.array([self.names.index(s) for s in subjects], np.int32)
        self.model.train(list(images), labels)
        return self

    def predict(self, images: list[np.ndarray]) -> list[str]:
        """The subject key the recogniser names for each image."""
        return [self.names[self.model.predict(img)[0]] for img in images]

    def accuracy(self, images: list[np.ndarray], subjects: list[str]) -> float:
        """Share of ``images`` attributed to their true subject."""
        pred = self.predict(images)
        return float(np.mean([p == s for p, s in zip(pred, subjects, strict=True)]))
