"""Spot-then-recognise: STRS = spotting F1 x analysis F1 (MEGC2023-2025).

Per LOSO fold, a spotter and a recogniser are trained on the training subjects only; the
spotter's intervals on the test subject that match a ground truth (IoU >= 0.5) are recognised,
and their predicted class is compared with the ground truth's emotion class
(:mod:`mer.spotting.labels`). Pooled over all folds:

- spotting F1: the MEGC overall F1 (micro + macro pooled);
- analysis F1: UF1 (mean per-class F1) of the recognised true positives whose ground truth
  has a class (those whose emotion has none, e.g. ``others``, are counted and listed, not
  scored);
- ``STRS = spotting F1 x analysis F1``.

Recognisers (``strs.recogniser``):

- ``flow``: a mer recognition network (``strs.model``, default STSTNet) on the onset -> apex
  (u, v, strain) image of each interval, computed from the video's frames
  (``mer.data.preprocess.pipeline.flow_image``; from the feature crops when the video has no
  frames on disk), trained on the training subjects' annotated intervals;
- ``me_tst``: ME-TST's own recognition head over its shared temporal features (the spotter
  must be ``me_tst``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from mer.spotting.labels import CLASSES, emotion_class
from mer.spotting.videos import SpotVideo


class RecogniserError(ValueError):
    """A recogniser that cannot be trained or used as configured."""


def _flow_from_arrays(onset: np.ndarray, apex: np.ndarray, params) -> np.ndarray:
    """(3, out, out) normalised (u, v, strain) of two grey frames (as ``flow_image``)."""
    import cv2

    from mer.data.preprocess.flow import compute_flow
    from mer.data.preprocess.pipeline import minmax_normalise
    from mer.data.preprocess.strain import optical_strain

    size = (params.work_size, params.work_size)
    a = cv2.resize(onset, size, interpolation=cv2.INTER_LINEAR)
    b = cv2.resize(apex, size, interpolation=cv2.INTER_LINEAR)
    flow = compute_flow(a, b, params.method, **params.method_params)
    stack = minmax_normalise(np.concatenate([flow.transpose(2, 0, 1),
                                             optical_strain(flow)[None]], axis=0))
    out = cv2.resize(stack.transpose(1, 2, 0), (params.out_size, params.out_size),
                     interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)


class FlowRecogniser:
    """A mer network on onset -> apex flow images of intervals (module docstring)."""

    def __init__(self, model: str = "ststnet", classes: list[str] | None = None,
                 epochs: int = 60, lr: float = 1e-3, batch_size: int = 32,
                 flow: dict | None = None, seed: int = 0, kwargs: dict | None = None) -> None:
        from mer.data.preprocess.pipeline import FlowParams

        self.model_name, self.classes = model, list(classes or CLASSES)
        self.epochs, self.lr, self.batch_size, self.seed = int(epochs), float(lr), \
            int(batch_size), int(seed)
        self.params = FlowParams(**(flow or {"method": "tvl1", "work_size": 64, "out_size": 28}))
        self.kwargs = dict(kwargs or {})
        self._frames: dict[str, dict[int, str]] = {}
        self.module = None

    def image(self, video: SpotVideo, onset: int, apex: int) -> np.ndarray:
        """The (3, 28, 28) flow image of frames ``onset -> apex`` of ``video``."""
        from mer.data.preprocess.pipeline import flow_image

        if video.frame_dir:
            if video.video not in self._frames:
                from mer.data.preprocess.longvideo import list_frames

                listed = list_frames(video.frame_dir)
                self._frames[video.video] = dict(zip(listed.numbers, listed.paths))
            frames = self._frames[video.video]
            numbers = np.array(sorted(frames))
            a, b = (int(numbers[np.abs(numbers - f).argmin()]) for f in (onset, apex))
            return flow_image(frames[a], frames[b], self.params,
                              sample=f"{video.video} frames {a}->{b}")
        if video.crops is None:
            raise RecogniserError(f"video {video.video}: no frames on disk and no crops in its "
                                  "features: nothing to compute the onset->apex flow from")
        i, j = video.positions([onset, apex])
        return _flow_from_arrays(video.crops[i], video.crops[max(j, i + 1)
                                                              if j == i and i + 1 <
                                                              video.length else j], self.params)

    def fit(self, videos: list[SpotVideo]) -> dict:
        from torch.utils.data import DataLoader, TensorDataset

        from mer.engine.module import MERModule
        from mer.models.registry import create_model
        from mer.spotting.module import fit_module

        x, y = [], []
        for v in videos:
            for r in v.gt.itertuples():
                c = emotion_class(r.emotion, self.classes)
                if c is not None:
                    apex = r.apex if r.apex >= 0 else (r.onset + r.offset) // 2
                    x.append(self.image(v, r.onset, apex))
                    y.append(self.classes.index(c))
        if not x:
            raise RecogniserError("no training interval has an emotion with a class of "
                                  f"{self.classes}: check the sheets' emotion column (SAMM-LV "
                                  "needs options.micro_sheet) or strs.classes")
        net = create_model(self.model_name, num_classes=len(self.classes), in_channels=3,
                           **self.kwargs)
        self.module = MERModule(net, len(self.classes), lr=self.lr, class_names=self.classes)
        data = _TupleDict(TensorDataset(torch.as_tensor(np.stack(x)), torch.as_tensor(y)))
        del DataLoader
        summary = fit_module(self.module, data, self.epochs, self.batch_size, self.seed)
        return {**summary, "n_train": len(y)}

    @torch.no_grad()
    def predict(self, video: SpotVideo, intervals: pd.DataFrame) -> list[str]:
        if not len(intervals):
            return []
        x = torch.as_tensor(np.stack([self.image(video, r.onset, r.apex)
                                      for r in intervals.itertuples()]))
        self.module.eval()
        pred = self.module(x).argmax(1).tolist()
        return [self.classes[i] for i in pred]


class _TupleDict(torch.utils.data.Dataset):
    """(x, y) items as the ``(x, y)`` tuples MERModule expects (fit_module shuffles them)."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


class HeadRecogniser:
    """ME-TST's own recognition head (the spotter is the recogniser)."""

    def __init__(self, spotter) -> None:
        if not hasattr(spotter, "recognise"):
            raise RecogniserError(f"strs.recogniser=me_tst needs the me_tst spotter, not "
                                  f"{spotter.name}; use strs.recogniser=flow with it")
        self.spotter = spotter
        self.classes = spotter.classes

    def fit(self, videos: list[SpotVideo]) -> dict:
        return {"shared_with_spotter": True}

    def predict(self, video: SpotVideo, intervals: pd.DataFrame) -> list[str]:
        return self.spotter.recognise(video, intervals[["onset", "offset"]].to_numpy())


def make_recogniser(strs_cfg: dict, spotter, seed: int):
    kind = strs_cfg.get("recogniser", "flow")
    classes = strs_cfg.get("classes") or CLASSES
    if kind == "me_tst":
        return HeadRecogniser(spotter)
    if kind == "flow":
        return FlowRecogniser(model=strs_cfg.get("model", "ststnet"), classes=classes,
                              epochs=strs_cfg.get("epochs", 60), lr=strs_cfg.get("lr", 1e-3),
                              batch_size=strs_cfg.get("batch_size", 32),
                              flow=strs_cfg.get("flow"), seed=seed,
                              kwargs=strs_cfg.get("kwargs"))
    raise RecogniserError(f"strs.recogniser={kind}: use flow or me_tst")


def recognise_matches(recogniser, video: SpotVideo, true_positives: pd.DataFrame,
                      gt_emotions, classes: list[str]) -> pd.DataFrame:
    """Recognise one video's true positives (rows with ``onset, apex, offset``); beside each
    its ground truth's emotion and class (``label`` None where the emotion has no class)."""
    if not len(true_positives):
        return pd.DataFrame(columns=["video", "onset", "offset", "gt_emotion", "label",
                                     "prediction"])
    pred = recogniser.predict(video, true_positives)
    return pd.DataFrame({
        "video": video.video, "onset": true_positives["onset"].to_numpy(),
        "offset": true_positives["offset"].to_numpy(), "gt_emotion": list(gt_emotions),
        "label": [emotion_class(e, classes) for e in gt_emotions], "prediction": pred})


def strs_score(spotting_f1: float | None, recognised: pd.DataFrame, classes: list[str]) -> dict:
    """Analysis F1 (UF1 over the classes of the recognised true positives) and STRS."""
    from mer.engine.metrics import recognition_metrics

    scored = recognised[recognised["label"].notna()] if len(recognised) else recognised
    if not len(scored):
        analysis = {"n": 0, "uf1": None, "uar": None}
    else:
        m = recognition_metrics(np.array([classes.index(c) for c in scored["label"]]),
                                np.array([classes.index(c) for c in scored["prediction"]]),
                                classes)
        analysis = {k: m[k] for k in ("n", "uf1", "uar", "accuracy")}
    f1 = spotting_f1 or 0.0
    return {"spotting_f1": spotting_f1, "analysis": analysis,
            "unscored_true_positives": int(len(recognised) - len(scored)),
            "strs": f1 * (analysis["uf1"] or 0.0)}
