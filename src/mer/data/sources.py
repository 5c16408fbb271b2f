"""From a data config to model-ready :class:`FlowSamples`: the one path for every database.

``data.kind`` picks the source:
- ``synme``: generate (or reuse) SynME, read each synthetic database with the CASME II reader
  it is written for, then preprocess exactly like real data;
- a database name of ``mer.data.databases.DATABASES`` (``casme2``, ``samm``, ``smic``,
  ``casme_sq``, ``casme3``, ``samm_lv``, ``mmew``, ``fourdme``): its release tree
  (``data.root``, optional ``data.sheet``, reader ``data.options``);
- ``composite``: several databases pooled (``data.roots: {name: path}``, optional
  ``data.sheets``), e.g. the MEGC2019 composite of CASME II, SAMM and SMIC-HS;
- ``flowcache``: a folder in the flow-cache exchange format (``data.root``, ``data.csv``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from mer.data.databases.casme2 import read_casme2
from mer.data.databases.registry import DATABASES, read_database
from mer.data.labels import apply_label_scheme
from mer.data.samples import FlowSamples

NO_AU_FAMILIES = {"smic"}


class DataConfigError(ValueError):
    """A data config that cannot be served (missing root, unknown kind...)."""


def _container(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def synme_config(data_cfg: DictConfig):
    """The SynMEConfig a data config asks for (``preset`` default/tiny, ``seed``)."""
    from mer.data import synthetic

    presets = {"default": synthetic.default_synme_config, "tiny": synthetic.tiny_synme_config}
    if data_cfg.preset not in presets:
        raise DataConfigError(f"data.preset '{data_cfg.preset}': use one of {sorted(presets)}")
    return presets[data_cfg.preset](seed=int(data_cfg.seed))


def read_tables(data_cfg: DictConfig, cache_dir: Path) -> tuple[pd.DataFrame, list[dict], dict,
                                                                  dict]:
    """Sample table of a frame-based source, skipped samples, families and provenance."""
    on_error = data_cfg.get("on_error", "raise")
    if data_cfg.kind == "synme":
        from mer.data.synthetic import ensure_synme

        syn = synme_config(data_cfg)
        root = ensure_synme(syn, Path(cache_dir) / "synme", workers=_workers(data_cfg))
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
                              class_names=tuple(data_cfg.class_names))
    from mer.data.preprocess.cache import FlowCache
    from mer.data.preprocess.pipeline import FlowParams, flow_images
    from mer.data.preprocess.prepared import prepared_images, use_prepared

    table, excluded, families, provenance = read_tables(data_cfg, Path(cache_dir))
    full = use_prepared(data_cfg, cache_dir) if prepared is None else prepared
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
            table, data_cfg, cache_dir, _workers(data_cfg), data_cfg.get("on_error", "raise"))
    else:
        x, kept, failures = flow_images(
            table, params, FlowCache(Path(cache_dir) / "flow"), workers=_workers(data_cfg),
            on_error=data_cfg.get("on_error", "raise"))
    excluded += failures
    meta = table.iloc[np.asarray(kept, dtype=np.int64)].reset_index(drop=True)
    meta = meta[["database", "subject", "clip", "label", "emotion", "au_raw", "aus", "onset",
                 "apex"]].copy()
    # the apex used: the sheet's, or estimated by the full pipeline where the sheet had none
    meta["apex_estimated"] = (meta["apex"] < 0).to_numpy() if full else False
    if full:
        meta["apex"] = provenance["prepare"].pop("apex")
    # Databases of a family without AU annotation (SMIC) train no AU head: the mask says so.
    meta["has_aus"] = [families[db] not in NO_AU_FAMILIES for db in meta["database"]]
    provenance["flow"] = params.key()
    if not full:
        landmarks = None
        if "landmarks" in table and len(kept):
            # fractions of the frame -> pixel centres of the out_size x out_size flow image
            kept_lm = np.stack(list(table["landmarks"].iloc[np.asarray(kept, dtype=np.int64)]))
            landmarks = (kept_lm * params.out_size - 0.5).astype(np.float32)
    return FlowSamples(x, meta, class_names, excluded, provenance["synthetic"], provenance,
                       landmarks)


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


def _workers(data_cfg: DictConfig) -> int:
    import os

    w = data_cfg.get("workers", "auto")
    return (os.cpu_count() or 1) if w == "auto" else int(w)
