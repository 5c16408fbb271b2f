"""The tables that flow through mer.

1. A **sample table** (``pandas.DataFrame``) is what a database reader yields, one row per clip:

   ========== =========================================================================
   column     meaning
   ========== =========================================================================
   database   database name (``casme2``, ``samm``, ``synA`` ...)
   subject    subject id as the database writes it (``sub01``, ``006``, ``s3``)
   clip       clip / filename id (``EP02_01f``)
   onset      onset frame number (int)
   apex       apex frame number (int, or -1 when the database gives none)
   offset     offset frame number (int, or -1)
   frame_dir  folder holding the clip's frames
   onset_path path of the onset frame image
   apex_path  path of the apex frame image ("" when apex is unknown)
   au_raw     the AU string exactly as in the sheet
   aus        tuple of AU numbers parsed from ``au_raw``
   au_unknown tuple of the tokens of ``au_raw`` that are not AUs (``soft focus``, ``?``)
   emotion    the database's own emotion word, lower-case ("" when the sheet has none)
   objective  the sheet's objective class ``I``..``VII`` (SAMM, CAS(ME)^3), else ""
   fps        frame rate
   row        1-based row of the annotation sheet (for error messages)
   ========== =========================================================================

   Readers yield no class label: a label scheme (``mer.data.labels``) turns ``emotion`` (or
   ``objective`` / ``aus``) into the ``label`` column.

2. An **interval table** is what a long-video database (CAS(ME)^2, SAMM-LV) gives for
   spotting, one row per annotated expression: ``database, subject, video, onset, apex,
   offset, type`` (``macro`` / ``micro``), ``au_raw, aus, au_unknown, emotion, frame_dir``
   (the video's frame folder), ``fps, row`` (``INTERVAL_COLUMNS``; see
   ``mer.data.databases.read_intervals``).

3. :class:`FlowSamples` is what models consume: one onset->apex flow image per sample plus the
   metadata and labels, and the list of samples excluded on purpose with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

SAMPLE_COLUMNS = [
    "database", "subject", "clip", "onset", "apex", "offset", "frame_dir", "onset_path",
    "apex_path", "au_raw", "aus", "au_unknown", "emotion", "objective", "fps", "row",
]

INTERVAL_COLUMNS = [
    "database", "subject", "video", "onset", "apex", "offset", "type", "au_raw", "aus",
    "au_unknown", "emotion", "frame_dir", "fps", "row",
]


def subject_key(database: str, subject: str) -> str:
    """Globally unique subject id: subjects of different databases are different people."""
    return f"{database}/{subject}"


@dataclass
class FlowSamples:
    """Model-ready samples.

    Attributes:
        x: (N, C, H, W) float32; C = 3 channels u, v, optical strain, each min-max normalised
           to [0, 1] per sample (the field's convention); H = W = 28 by default.
        meta: N rows with at least ``database, subject, clip, label`` (label an int class index)
              and ``subject_key``; ``emotion`` when known.
        class_names: class index -> name.
        excluded: samples left out on purpose, each ``{"database", "subject", "clip", "reason"}``.
        synthetic: True when the samples come from SynME.
        provenance: where the samples come from (paths, config fingerprints), for results.json.
        landmarks: optional (N, 68, 2) float32 iBUG-68 landmarks (x, y) in the pixel frame of
            ``x`` (known for SynME; from the face detector with ``mer.prepare``).
        inputs: named model inputs next to ``x`` (``apex_crop`` (N, 1, S, S), ``frames``
            (N, 1, T, S, S)...; :mod:`mer.data.inputs`), filled on demand for the network that
            declares them; the datamodule puts them in each batch after ``(x, y)``.
        input_source: where the samples' frames are (:class:`mer.data.inputs.InputSource`);
            None for a flow cache, which has none.
        pretrain: samples of a pretraining stage (e.g. macro-expressions for macro-to-micro
            transfer), attached by the runner; None without one.
    """

    x: np.ndarray
    meta: pd.DataFrame
    class_names: list[str]
    excluded: list[dict] = field(default_factory=list)
    synthetic: bool = False
    provenance: dict = field(default_factory=dict)
    landmarks: np.ndarray | None = None
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    input_source: Any = None
    pretrain: FlowSamples | None = None

    def __post_init__(self) -> None:
        if len(self.x) != len(self.meta):
            raise ValueError(f"FlowSamples: {len(self.x)} flow images but {len(self.meta)} rows")
        for name, arr in self.inputs.items():
            if len(arr) != len(self.x):
                raise ValueError(f"FlowSamples: input '{name}' has {len(arr)} rows for "
                                 f"{len(self.x)} samples")
        if self.landmarks is not None and self.landmarks.shape != (len(self.x), 68, 2):
            raise ValueError(f"FlowSamples: landmarks {self.landmarks.shape}, expected "
                             f"({len(self.x)}, 68, 2)")
        self.meta = self.meta.reset_index(drop=True)
        self._refuse_non_finite()
        if "subject_key" not in self.meta:
            self.meta["subject_key"] = [
                subject_key(d, s) for d, s in zip(self.meta["database"], self.meta["subject"])
            ]

    def _refuse_non_finite(self) -> None:
        """Raise ValueError naming the samples (database/subject/clip, sheet row) whose flow
        holds NaN or inf: a model fed one would score garbage, or NaN."""
        x = np.asarray(self.x)
        if x.dtype.kind != "f" or len(x) == 0:
            return
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if finite.all():
            return
        bad = np.flatnonzero(~finite)
        meta = self.meta.iloc[bad[:5]]

        def name(r) -> str:
            ids = "/".join(str(r.get(k, "?")) for k in ("database", "subject", "clip"))
            return ids + (f" (row {r['row']})" if "row" in r and r["row"] == r["row"] else "")

        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(
            f"FlowSamples: non-finite flow values (NaN/inf) in {len(bad)} samples: "
            f"{', '.join(name(r) for _, r in meta.iterrows())}{more}. Their flow is broken "
            "(unreadable or identical frames, a bad face crop): check those clips' frames and "
            "delete their entries in the preprocessing cache (paths.cache_dir) to recompute "
            "them, or remove the clips from the annotation sheet")

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 class indices."""
        return self.meta["label"].to_numpy(dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def au_targets(self, au_list: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(N, len(au_list)) float32 multi-hot AU targets and (N,) bool mask of labelled samples.

        Uses meta columns ``aus`` (tuples of AU numbers) and ``has_aus``; without them no sample
        is labelled (the AU loss is then masked out, never faked).
        """
        from mer.data.aus import PSYAU_AUS, multi_hot

        au_list = au_list or PSYAU_AUS
        n = len(self.meta)
        if "aus" not in self.meta:
            return np.zeros((n, len(au_list)), np.float32), np.zeros(n, bool)
        au = np.stack([multi_hot(a, au_list) for a in self.meta["aus"]]) if n else \
            np.zeros((0, len(au_list)), np.float32)
        mask = self.meta["has_aus"].to_numpy(bool) if "has_aus" in self.meta else np.ones(n, bool)
        return au.astype(np.float32), mask

    def subset(self, index: np.ndarray) -> FlowSamples:
        """The samples at ``index`` (int positions), same classes."""
        return FlowSamples(
            self.x[index], self.meta.iloc[index].reset_index(drop=True), self.class_names,
            self.excluded, self.synthetic, self.provenance,
            None if self.landmarks is None else self.landmarks[index],
            {k: v[index] for k, v in self.inputs.items()},
            None if self.input_source is None else self.input_source.subset(index),
            self.pretrain,
        )
