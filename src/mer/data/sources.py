"""From a data config to model-ready :class:`FlowSamples`: the one path for every database.

``data.kind`` picks the source:
- ``synme``: generate (or reuse) SynME, read each synthetic database with the CASME II reader
  it is written for, then preprocess exactly like real data;
- a database name of ``mer.data.databases.DATABASES`` (``casme2``, ``samm``, ``smic``,
  ``casme_sq``, ``casme3``, ``samm_lv``, ``mmew``, ``fourdme``): its release tree
  (``data.root``, optional ``data.sheet``, reader ``data.options``);
- ``composite``: several databases pooled (``data.roots: {name: path}``, optional
  ``data.sheets``), e.g. the MEGC2019 composite of CASME II, SAMM and SMIC-HS;
- ``flowcache``: a folder in the flow-cache exchange format (``data.root``, ``data.csv``);
- ``synme_lv``: SynME-LV, the synthetic long videos (``preset``, ``seed``, ``databases``),
  written in the CAS(ME)^2 and SAMM-LV layouts and read by their readers.

Long videos (spotting) go through :func:`load_intervals`: the readers' interval tables and the
video list of ``synme_lv``, ``casme_sq`` / ``samm_lv`` (``data.root``) or a ``composite`` of
them (``data.roots``); features: :mod:`mer.data.preprocess.longvideo`.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from mer.data.databases.casme2 import read_casme2
from mer.data.databases.registry import DATABASES, read_database
from mer.data.labels import apply_label_scheme
from mer.data.samples import FlowSamples

NO_AU_FAMILIES = {"smic"}
log = logging.getLogger(__name__)


class DataConfigError(ValueError):
    """A data config that cannot be served (missing root, unknown kind...)."""


def _container(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def synme_config(data_cfg: DictConfig):
    """The SynMEConfig a data config asks for (``preset`` default/tiny, ``seed``)."""
    from mer.data import synthetic

    presets = synthetic.PRESETS  # default, tiny, dfme, casme3, ... (synthetic.py)
    if data_cfg.preset not in presets:
        raise DataConfigError(f"data.preset '{data_cfg.preset}': use one of {sorted(presets)}")
    cfg = presets[data_cfg.preset](seed=int(data_cfg.seed))
    cfg.macro = bool(data_cfg.get("macro", False))  # data=synme_macro: its macro-expressions
    return cfg


def synme_lv_config(data_cfg: DictConfig):
    """The SynMELVConfig a data config asks for (``preset``, ``seed``, ``databases``)."""
    from mer.data.synthetic_lv import PRESETS, SynMELVConfig

    preset = data_cfg.get("preset", "default")
    if preset not in PRESETS:
        raise DataConfigError(f"data.preset '{preset}': use one of {sorted(PRESETS)}")
    cfg = SynMELVConfig.preset(preset, seed=int(data_cfg.get("seed", 0)))
    names = _container(data_cfg.get("databases")) or [d.name for d in cfg.databases]
    try:
        return cfg.select(list(names))
    except ValueError as e:
        raise DataConfigError(f"data.databases={list(names)}: {e}") from e


def _synme_lv_sources(data_cfg: DictConfig, cache_dir: Path) -> tuple[list[dict], dict]:
    """(reader calls, provenance) of SynME-LV, generated on first use."""
    from mer.data.synthetic_lv import SAMM_MICRO_SHEET, ensure_synme_lv

    syn = synme_lv_config(data_cfg)
    root = ensure_synme_lv(syn, Path(cache_dir) / "synme_lv", workers=data_workers(data_cfg))
    calls = [{"database": spec.name, "reader": spec.layout, "root": root / spec.name,
              "sheet": None, "fps": float(spec.fps), "synthetic_meta": str(root / spec.name),
              "options": {"micro_sheet": root / spec.name / SAMM_MICRO_SHEET}
              if spec.layout == "samm_lv" else {}} for spec in syn.databases]
    return calls, {"source": "synme_lv", "root": str(root), "fingerprint": syn.fingerprint(),
                   "synthetic": True}


def read_tables(data_cfg: DictConfig, cache_dir: Path) -> tuple[pd.DataFrame, list[dict], dict,
                                                                  dict]:
    """Sample table of a frame-based source, skipped samples, families and provenance."""
    on_error = data_cfg.get("on_error", "raise")
    if data_cfg.kind == "synme_lv":  # its micro-expressions as clips (spot-then-recognise)
        calls, provenance = _synme_lv_sources(data_cfg, cache_dir)
        tables, skipped = [], []
        for c in calls:
            t, s = read_database(c["reader"], c["root"], on_error=on_error,
                                 database=c["database"], **c["options"])
            t["fps"] = c["fps"]
            tables.append(t)
            skipped += s
        families = {c["database"]: (data_cfg.get("families") or {}).get(c["database"],
                                                                         c["reader"])
                    for c in calls}
        return pd.concat(tables, ignore_index=True), skipped, families, provenance
    if data_cfg.kind == "synme":
        from mer.data.synthetic import ensure_synme

        syn = synme_config(data_cfg)
        root = ensure_synme(syn, Path(cache_dir) / "synme", workers=data_workers(data_cfg))
        tables, skipped = [], []
        for spec in syn.databases:
            t, s = read_casme2(root / spec.name, database=spec.name, on_error=on_error)
            t["fps"] = float(spec.fps)  # the CASME II reader assumes CASME II's 200 fps
            t["landmarks"] = _synme_landmarks(root / spec.name, t, spec.width, spec.height)
            tables.append(t)
            skipped += s
        families = {spec.name: data_cfg.families.get(spec.name, "casme2")
                    for spec in syn.databases}
        provenance = {"source": "synme", "root": str(root), "fingerprint": syn.fingerprint(),
                      "synthetic": True}
        return pd.concat(tables, ignore_index=True), skipped, families, provenance
    if data_cfg.kind in DATABASES:
        root = _root(data_cfg)
        options = _container(data_cfg.get("options")) or {}
        t, skipped = read_database(data_cfg.kind, root, sheet=data_cfg.get("sheet"),
                                   on_error=on_error, **options)
        return t, skipped, {data_cfg.kind: data_cfg.kind}, {
            "source": data_cfg.kind, "root": str(root), "synthetic": False}
    if data_cfg.kind == "composite":
        tables, skipped, roots = [], [], {}
        sheets = data_cfg.get("sheets") or {}
        for name, root in data_cfg.roots.items():
            if name not in DATABASES:
                raise DataConfigError(f"data.roots.{name}: unknown database; use one of "
                                      f"{sorted(DATABASES)}")
            if not root or not Path(str(root)).expanduser().exists():
                raise DataConfigError(f"data=composite needs data.roots.{name}=/path/to/{name} "
                                      f"(got {root})")
            roots[name] = str(Path(str(root)).expanduser())
            t, s = read_database(name, roots[name], sheet=sheets.get(name), on_error=on_error)
            tables.append(t)
            skipped += s
        return pd.concat(tables, ignore_index=True), skipped, {n: n for n in roots}, {
            "source": "composite", "roots": roots, "synthetic": False}
    raise DataConfigError(f"data.kind '{data_cfg.kind}' has no frame reader")


def load_samples(data_cfg: DictConfig, cache_dir: str | Path,
                 prepared: bool | None = None) -> FlowSamples:
    """Build the FlowSamples a data config describes, using the on-disk caches.

    ``prepared``: serve frame-based sources through the full pipeline (face, alignment, apex
    estimation, ``mer.data.preprocess.prepared``); None follows ``data.prepared`` (``auto``:
    once ``python -m mer.prepare`` has prepared this config).
    """
    if data_cfg.kind == "flowcache":
        from mer.data.databases.flowcache import read_flowcache

        return read_flowcache(_root(data_cfg), csv=data_cfg.get("csv"),
                              class_names=tuple(data_cfg.class_names),
                              sheets=_container(data_cfg.get("sheets")),  # AUs (issue 15)
                              on_unmatched=data_cfg.get("on_unmatched", "raise"))
    from mer.data.preprocess.cache import FlowCache
    from mer.data.preprocess.pipeline import FlowParams, flow_images
    from mer.data.preprocess.prepared import prepared_images, use_prepared

    full = use_prepared(data_cfg, cache_dir) if prepared is None else prepared
    if not full and (_container(data_cfg.get("magnify")) or {}).get("enabled"):
        raise DataConfigError(
            "data.magnify.enabled=true: Eulerian magnification is a step of the full pipeline, "
            "which this run does not use (mer.prepare has not prepared this data config). Run "
            "`python -m mer.prepare` with the same data overrides first (mer.run then uses "
            "it), or set data.prepared=true. (Models that magnify their own input, "
            "model=dense_attention or mpfnet_p/_c, need no data.magnify.enabled.)")
    table, excluded, families, provenance = read_tables(data_cfg, Path(cache_dir))
    no_apex = (table["apex"] < 0) & (not full)  # the full pipeline estimates the apex
    for r in table[no_apex].itertuples():
        excluded.append({"database": r.database, "subject": r.subject, "clip": r.clip,
                         "reason": "no apex frame in the sheet (apex estimation: mer.prepare)"})
    table = table[~no_apex].reset_index(drop=True)
    table, class_names, dropped = apply_label_scheme(
        table, _container(data_cfg.label_scheme), families)
    excluded += dropped
    params = FlowParams(**_container(data_cfg.flow))
    if full:
        x, kept, failures, landmarks, provenance["prepare"] = prepared_images(
            table, data_cfg, cache_dir, data_workers(data_cfg), data_cfg.get("on_error", "raise"))
    else:
        x, kept, failures = flow_images(
            table, params, FlowCache(Path(cache_dir) / "flow"), workers=data_workers(data_cfg),
            on_error=data_cfg.get("on_error", "raise"))
    excluded += failures
    meta = table.iloc[np.asarray(kept, dtype=np.int64)].reset_index(drop=True)
    meta = meta[["database", "subject", "clip", "label", "emotion", "au_raw", "aus", "onset",
                 "apex"]].copy()
    # the apex used: the sheet's, or estimated by the full pipeline where the sheet had none
    meta["apex_estimated"] = (meta["apex"] < 0).to_numpy() if full else False
    matrices = None
    if full:
        meta["apex"] = provenance["prepare"].pop("apex")
        matrices = provenance["prepare"].pop("matrix", None)
    # Databases of a family without AU annotation (SMIC) train no AU head: the mask says so.
    meta["has_aus"] = [families[db] not in NO_AU_FAMILIES for db in meta["database"]]
    provenance["flow"] = params.key()
    if not full:
        landmarks = None
        if "landmarks" in table and len(kept):
            # fractions of the frame -> pixel centres of the out_size x out_size flow image
            kept_lm = np.stack(list(table["landmarks"].iloc[np.asarray(kept, dtype=np.int64)]))
            landmarks = (kept_lm * params.out_size - 0.5).astype(np.float32)
    source = _input_source(data_cfg, table.iloc[np.asarray(kept, dtype=np.int64)], meta,
                           matrices, cache_dir, full)
    return FlowSamples(x, meta, class_names, excluded, provenance["synthetic"], provenance,
                       landmarks, input_source=source)


def _input_source(data_cfg: DictConfig, rows: pd.DataFrame, meta: pd.DataFrame,
                  matrices: np.ndarray | None, cache_dir: str | Path, full: bool):
    """Where the kept samples' frames are, for the named model inputs (``mer.data.inputs``)."""
    from mer.data.inputs import InputSource

    keep = ["database", "subject", "clip", "onset", "apex", "offset", "onset_path", "fps", "row"]
    records = rows[[c for c in keep if c in rows]].to_dict("records")
    for r, apex in zip(records, meta["apex"].to_numpy()):
        r["apex"] = int(apex)  # the apex the flow used (estimated by mer.prepare if need be)
    flow = _container(data_cfg.get("flow")) or {}
    magnify = _container(data_cfg.get("magnify")) or {}
    return InputSource(
        records, origin=str(data_cfg.get("name", data_cfg.kind)), matrices=matrices,
        crop_size=int(flow.get("work_size", 128)), flow=flow, magnify=magnify,
        x_magnified=bool(full and magnify.get("enabled")), cache_dir=str(cache_dir))


@dataclass
class LongVideoTables:
    """What :func:`load_intervals` returns.

    Attributes:
        intervals: ``mer.data.samples.INTERVAL_COLUMNS`` + ``video_id`` (``<database>/<video>``):
            one ground-truth interval per row (``type`` micro/macro, onset <= apex <= offset,
            frame numbers of the files), every database concatenated, sorted as read.
        videos: one row per video folder (with or without intervals): ``database, subject,
            video, video_id, frame_dir, fps, first_frame, last_frame, n_frames, gaps`` (missing
            frame runs) and ``synthetic_meta`` (SynME-LV: its database folder, else "").
        excluded: intervals left out (``on_error=skip``), ``{database, subject, clip, reason}``.
        synthetic: True for SynME-LV; provenance: source, roots, fingerprint.
    """

    intervals: pd.DataFrame
    videos: pd.DataFrame
    excluded: list[dict] = field(default_factory=list)
    synthetic: bool = False
    provenance: dict = field(default_factory=dict)


VIDEO_COLUMNS = ["database", "subject", "video", "video_id", "frame_dir", "fps", "first_frame",
                 "last_frame", "n_frames", "gaps", "synthetic_meta"]


def load_intervals(data_cfg: DictConfig, cache_dir: str | Path) -> LongVideoTables:
    """Ground-truth intervals and videos of a long-video data config (``synme_lv``;
    ``casme_sq`` / ``samm_lv`` with ``data.root``; ``composite`` with ``data.roots`` of them).

    The readers check each row (``collect_intervals``); then the checks they cannot make
    (overlapping intervals of a video, intervals over missing frames:
    :func:`mer.data.preprocess.longvideo.check_intervals`). ``data.on_error``: ``raise`` stops
    at the first bad interval naming the sheet row or video; ``skip`` lists it in ``excluded``.
    """
    from mer.data.databases.casme_sq import FPS as CASME_SQ_FPS
    from mer.data.databases.casme_sq import list_casme_sq_videos
    from mer.data.databases.registry import LONG_VIDEO, read_intervals
    from mer.data.databases.samm_lv import FPS as SAMM_LV_FPS
    from mer.data.databases.samm_lv import list_samm_lv_videos
    from mer.data.preprocess.longvideo import LongVideoError, check_intervals, list_frames

    listers = {"casme_sq": (list_casme_sq_videos, CASME_SQ_FPS),
               "samm_lv": (list_samm_lv_videos, SAMM_LV_FPS)}
    on_error = data_cfg.get("on_error", "raise")
    kind = data_cfg.get("kind")
    if kind == "synme_lv":
        calls, provenance = _synme_lv_sources(data_cfg, Path(cache_dir))
    elif kind in LONG_VIDEO:
        calls = [{"database": kind, "reader": kind, "root": _root(data_cfg),
                  "sheet": data_cfg.get("sheet"), "fps": listers[kind][1], "synthetic_meta": "",
                  "options": _container(data_cfg.get("options")) or {}}]
        provenance = {"source": kind, "root": str(calls[0]["root"]), "synthetic": False}
    elif kind == "composite":
        calls, sheets = [], _container(data_cfg.get("sheets")) or {}
        for name, root in (_container(data_cfg.get("roots")) or {}).items():
            if name not in LONG_VIDEO:
                raise DataConfigError(f"data.roots.{name}: no long videos; spotting reads "
                                      f"{sorted(LONG_VIDEO)}")
            path = Path(str(root)).expanduser() if root else None
            if path is None or not path.exists():
                raise DataConfigError(f"data.roots.{name}=/path/to/{name} is needed (got {root})")
            calls.append({"database": name, "reader": name, "root": path,
                          "sheet": sheets.get(name), "fps": listers[name][1],
                          "synthetic_meta": "", "options": {}})
        if not calls:
            raise DataConfigError("data=composite for spotting needs data.roots with casme_sq "
                                  "and/or samm_lv")
        provenance = {"source": "composite", "roots": {c["database"]: str(c["root"])
                                                       for c in calls}, "synthetic": False}
    else:
        raise DataConfigError(f"data.kind '{kind}' has no long videos; use synme_lv, casme_sq, "
                              "samm_lv or composite (data.roots)")
    tables, videos, excluded = [], [], []
    for c in calls:
        accepted = inspect.signature(LONG_VIDEO[c["reader"]]).parameters
        unused = sorted(set(c["options"]) - set(accepted))  # clip-reading options (types...)
        if unused:
            log.info("data.options %s are not used for the intervals of %s", unused,
                     c["database"])
        options = {k: v for k, v in c["options"].items() if k in accepted}
        t, s = read_intervals(c["reader"], c["root"], c["sheet"], on_error=on_error,
                              database=c["database"], **options)
        t["fps"] = c["fps"]
        tables.append(t)
        excluded += s
        listed = {(v["subject"], v["video"]): v["frame_dir"]
                  for v in listers[c["reader"]][0](c["root"])}
        for r in t.itertuples():  # every interval's folder exists (the reader checked)
            listed.setdefault((r.subject, r.video), Path(r.frame_dir))
        annotated = set(zip(t["subject"], t["video"], strict=True))
        for (subject, video), frame_dir in sorted(listed.items()):
            try:
                frames = list_frames(frame_dir)
            except LongVideoError as e:  # a folder without frames and without intervals
                if on_error == "raise" or (subject, video) in annotated:
                    raise LongVideoError(f"{e} (or set data.on_error=skip to leave the video "
                                         "out; it is then listed in the report)") from e
                excluded.append({"database": c["database"], "subject": subject, "clip": video,
                                 "reason": f"video left out: {e}"})
                continue
            videos.append({"database": c["database"], "subject": subject, "video": video,
                           "video_id": f"{c['database']}/{video}", "frame_dir": str(frame_dir),
                           "fps": c["fps"], "first_frame": frames.numbers[0],
                           "last_frame": frames.numbers[-1], "n_frames": len(frames.numbers),
                           "gaps": frames.gaps, "synthetic_meta": c["synthetic_meta"]})
    intervals = pd.concat(tables, ignore_index=True)
    intervals["video_id"] = intervals["database"] + "/" + intervals["video"]
    video_table = pd.DataFrame(videos, columns=VIDEO_COLUMNS)
    intervals, dropped = check_intervals(intervals, video_table, on_error)
    return LongVideoTables(intervals, video_table, excluded + dropped,
                           bool(provenance["synthetic"]), provenance)


def _synme_landmarks(db_dir: Path, table: pd.DataFrame, width: int, height: int) -> list:
    """Each row's subject landmarks from SynME's meta, as fractions of the frame (68, 2)."""
    from mer.data.synthetic import load_meta

    subjects = load_meta(db_dir)["subjects"]
    scale = np.array([width, height], dtype=np.float64)
    return [(np.asarray(subjects[s]["landmarks"]) + 0.5) / scale for s in table["subject"]]


def _root(data_cfg: DictConfig) -> Path:
    if not data_cfg.get("root"):
        raise DataConfigError(
            f"data={data_cfg.name} needs data.root=/path/to/the/database (none given)")
    root = Path(str(data_cfg.root)).expanduser()
    if not root.exists():
        raise DataConfigError(f"data.root does not exist: {root}")
    return root


def data_workers(data_cfg: DictConfig) -> int:
    """``data.workers`` as a number of processes (``auto``: one per CPU)."""
    import os

    w = data_cfg.get("workers", "auto")
    return (os.cpu_count() or 1) if w == "auto" else int(w)
