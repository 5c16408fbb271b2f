"""Is SynME learnable but not trivial? A leave-one-subject-out baseline on onset->apex flow.

Generates (or reuses) the default SynME config, computes TV-L1 optical flow between the onset
and apex frames of every clip (greyscale, resized to 64x64), downsizes the flow to 12x12 and
fits a logistic regression per LOSO fold on the 3-class MEGC composite labels (positive,
negative, surprise; others/other dropped). Prints UF1 (macro F1) and UAR of the predictions
pooled over all folds, overall and per database. Target: clearly above chance (0.33), far from
perfect (roughly UF1 0.45-0.75).

    python scripts/check_synme_learnability.py --cache-dir /tmp/synme --workers 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, recall_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mer.data.synthetic import (
    FRAME_ROOT,
    SHEET_NAME,
    SynMEConfig,
    default_synme_config,
    ensure_synme,
)

COMPOSITE = {
    "happiness": "positive", "positive": "positive", "surprise": "surprise",
    **{e: "negative" for e in ("anger", "contempt", "disgust", "fear", "sadness", "repression",
                               "negative")},
}
CLASSES = ["negative", "positive", "surprise"]


def onset_apex_flow(folder: Path, onset: int, apex: int, tvl1: cv2.DenseOpticalFlow) -> np.ndarray:
    """(12, 12, 2) float32 TV-L1 flow of a clip's onset->apex pair (on 64x64 grey frames)."""
    def load(n: int) -> np.ndarray:
        img = cv2.imread(str(folder / f"img{n}.jpg"), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise FileNotFoundError(folder / f"img{n}.jpg")
        return cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA)

    flow = tvl1.calc(load(onset), load(apex), None)
    return cv2.resize(flow, (12, 12), interpolation=cv2.INTER_AREA)


def load_samples(root: Path, cfg: SynMEConfig) -> pd.DataFrame:
    """One row per clip with a composite label: database, subject, folder, onset, apex, label."""
    rows = []
    for spec in cfg.databases:
        sheet = pd.read_excel(root / spec.name / SHEET_NAME)
        for _, r in sheet.iterrows():
            label = COMPOSITE.get(str(r["emotion"]).strip().lower())
            if label is None:
                continue
            subject = f"sub{int(r['Subject']):02d}"
            rows.append({
                "database": spec.name, "subject": f"{spec.name}/{subject}",
                "folder": root / spec.name / FRAME_ROOT / subject / str(r["Filename"]),
                "onset": int(r["Onset Frame"]), "apex": int(r["Apex Frame"]), "label": label,
            })
    return pd.DataFrame(rows)


def loso_predict(x: np.ndarray, y: np.ndarray, groups: np.ndarray, c: float) -> np.ndarray:
    """Predictions of a leave-one-subject-out logistic regression, pooled over folds."""
    pred = np.empty_like(y)
    for g in np.unique(groups):
        test = groups == g
        if len(np.unique(y[~test])) < 2:
            pred[test] = y[~test][0]
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
        model.fit(x[~test], y[~test])
        pred[test] = model.predict(x[test])
    return pred


def scores(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    labels = np.unique(y)
    uf1 = f1_score(y, pred, labels=labels, average="macro", zero_division=0)
    uar = recall_score(y, pred, labels=labels, average="macro", zero_division=0)
    return float(uf1), float(uar)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/synme-cache"),
                    help="where SynME is generated / found (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="SynME seed (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=2,
                    help="generation processes, 0 = sequential (default: %(default)s)")
    ap.add_argument("--C", type=float, default=0.05,
                    help="inverse L2 strength of the logistic regression (default: %(default)s)")
    args = ap.parse_args()

    cfg = default_synme_config(args.seed)
    t0 = time.perf_counter()
    root = ensure_synme(cfg, args.cache_dir, workers=args.workers, progress=True)
    print(f"SynME at {root} ({time.perf_counter() - t0:.1f} s, workers={args.workers})")

    samples = load_samples(root, cfg)
    tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()
    t0 = time.perf_counter()
    x = np.stack([onset_apex_flow(r.folder, r.onset, r.apex, tvl1).ravel()
                  for r in samples.itertuples()])
    print(f"flow of {len(samples)} clips: {time.perf_counter() - t0:.1f} s")
    y = samples["label"].to_numpy()
    counts = samples.groupby(["database", "label"]).size().unstack(fill_value=0)
    print(counts.to_string())

    pred = loso_predict(x, y, samples["subject"].to_numpy(), args.C)
    uf1, uar = scores(y, pred)
    print(f"all       n={len(y):4d}  UF1 {uf1:.3f}  UAR {uar:.3f}")
    for db in samples["database"].unique():
        m = (samples["database"] == db).to_numpy()
        uf1, uar = scores(y[m], pred[m])
        print(f"{db:9s} n={m.sum():4d}  UF1 {uf1:.3f}  UAR {uar:.3f}")
    print(pd.crosstab(pd.Series(y, name="true"), pd.Series(pred, name="pred")).to_string())


if __name__ == "__main__":
    main()
