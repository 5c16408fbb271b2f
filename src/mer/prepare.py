"""``python -m mer.prepare``: preprocess a database into the cache (thin Hydra main).

Runs the full pipeline (face, eye-level alignment, apex estimation, optional magnification,
onset->apex flow; ``mer.data.preprocess.prepared``) over every sample of ``data`` and stores
one cache entry per clip. A later ``python -m mer.run`` with the same data config trains on
those entries (``data.prepared: auto``). An interrupted prepare resumes where it stopped.
Writes ``prepare_report.json`` and ``.md`` (counts per class and database, the apex of each
clip and whether it was estimated, every excluded sample with its reason (failures remembered
from an earlier run say so), time per stage) into the run folder and next to the cache entries.

Long-video data configs (``data=synme_lv``, or a real CAS(ME)^2 / SAMM-LV with
``+data.long_videos=true``) are prepared for spotting instead: per-frame ROI flow of every video,
cached per chunk (``mer.data.preprocess.longvideo``), with a long-video prepare report.

Examples::

    python -m mer.prepare data=synme
    python -m mer.prepare data=synme_lv data.preset=tiny
    python -m mer.prepare data=casme2 data.root=/path/to/CASME2 data.on_error=skip
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mer.cli import user_errors_exit
from mer.config_check import check_or_exit
from mer.engine.runlock import one_run_per_folder
from mer.paths import CONF_DIR

log = logging.getLogger(__name__)


def build_report(samples, data_cfg: DictConfig, seconds: float) -> dict[str, Any]:
    """The prepare report of loaded FlowSamples (``provenance["prepare"]`` set)."""
    from mer.data.preprocess.prepared import STAGES

    info = samples.provenance.get("prepare", {})
    counts: dict[str, dict[str, int]] = {}
    for db, label in zip(samples.meta["database"], samples.meta["label"], strict=True):
        row = counts.setdefault(str(db), dict.fromkeys(samples.class_names, 0))
        row[samples.class_names[int(label)]] += 1
    total = Counter(samples.class_names[int(v)] for v in samples.meta["label"])
    stages = info.get("stage_seconds", {})
    phases = info.get("phase_seconds", {})
    read = seconds - sum(phases.values())
    meta = samples.meta
    estimated = meta["apex_estimated"] if "apex_estimated" in meta else [False] * len(meta)
    apex = [{"database": str(db), "subject": str(sub), "clip": str(clip), "onset": int(on),
             "apex": int(ap), "estimated": bool(est)}
            for db, sub, clip, on, ap, est in zip(meta["database"], meta["subject"],
                                                  meta["clip"], meta["onset"], meta["apex"],
                                                  estimated, strict=True)]
    return {
        "data": str(data_cfg.name), "config_id": info.get("config_id"),
        "synthetic": bool(samples.synthetic),
        "source": {k: v for k, v in samples.provenance.items() if k not in ("prepare", "flow")},
        "params": info.get("params"),
        "samples": len(samples.meta), "classes": list(samples.class_names),
        "counts": counts, "counts_total": {c: total.get(c, 0) for c in samples.class_names},
        "apex": apex,
        "excluded": list(samples.excluded),
        "cache": {"dir": info.get("cache"), "hits": info.get("hits", 0),
                  "computed": info.get("computed", 0),
                  "failures_remembered": info.get("remembered", 0)},
        "seconds": {"total": seconds, "read_tables": read, **phases,
                    "stages_summed_over_clips": {s: stages.get(s, 0.0) for s in STAGES}},
    }


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a short markdown page."""
    classes = report["classes"]
    cache = report["cache"]
    remembered = cache.get("failures_remembered", 0)
    lines = [f"# Prepare report: {report['data']}", "",
             f"{report['samples']} samples prepared, {len(report['excluded'])} excluded; "
             f"cache hits {cache['hits']}, computed {cache['computed']}"
             + (f", failures remembered from an earlier run (not tried again) {remembered}"
                if remembered else "")
             + (" (synthetic data: SynME)" if report["synthetic"] else "") + ".", "",
             "## Counts", "", "| database | " + " | ".join(classes) + " | total |",
             "|---" * (len(classes) + 2) + "|"]
    for db, row in report["counts"].items():
        lines.append(f"| {db} | " + " | ".join(str(row[c]) for c in classes)
                     + f" | {sum(row.values())} |")
    tot = report["counts_total"]
    lines.append("| all | " + " | ".join(str(tot[c]) for c in classes)
                 + f" | {sum(tot.values())} |")
    lines += ["", "## Time (s)", "", "| stage | seconds |", "|---|---|"]
    sec = report["seconds"]
    for k in ("total", "read_tables", "hash", "compute"):
        if k in sec:
            lines.append(f"| {k} | {sec[k]:.2f} |")
    for k, v in sec["stages_summed_over_clips"].items():
        lines.append(f"| {k} (summed over computed clips) | {v:.2f} |")
    apex = report.get("apex", [])
    guessed = [a for a in apex if a["estimated"]]
    lines += ["", f"## Apex (estimated for {len(guessed)} of {len(apex)} clips)", ""]
    if guessed:
        lines += ["The sheet gives no apex for these clips: the frame of largest facial motion "
                  "after the onset was used (every clip's apex is in the JSON report).", "",
                  "| database | subject | clip | onset | apex |", "|---|---|---|---|---|"]
        lines += [f"| {a['database']} | {a['subject']} | {a['clip']} | {a['onset']} | "
                  f"{a['apex']} |" for a in guessed]
    else:
        lines.append("Every clip's apex comes from the sheet.")
    lines += ["", f"## Excluded ({len(report['excluded'])})", ""]
    if report["excluded"]:
        lines += ["| database | subject | clip | reason |", "|---|---|---|---|"]
        for e in report["excluded"]:
            reason = str(e["reason"]).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {e['database']} | {e['subject']} | {e['clip']} | {reason} |")
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], folder: str | Path) -> Path:
    """Write ``prepare_report.json`` and ``.md`` into ``folder``; returns the JSON path."""
    from mer.data.preprocess.prepared import REPORT_NAME

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{REPORT_NAME}.json"
    md = folder / f"{REPORT_NAME}.md"
    tmp, md_tmp = path.with_suffix(".json.tmp"), md.with_suffix(".md.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    md_tmp.write_text(report_markdown(report))
    md_tmp.replace(md)
    tmp.replace(path)  # the JSON last: its presence marks a finished prepare
    return path


def prepare(cfg: DictConfig, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Prepare ``cfg.data`` into ``cfg.paths.cache_dir``; the report, also written to disk."""
    from mer.data.preprocess.longvideo import is_long_video, prepare_report
    from mer.data.preprocess.prepared import manifest_dir
    from mer.data.sources import load_samples

    if is_long_video(cfg.data):  # spotting: long-video features, their own report
        return prepare_report(cfg.data, cfg.paths.cache_dir, out_dir)

    t0 = time.perf_counter()
    samples = load_samples(cfg.data, cfg.paths.cache_dir, prepared=True)
    report = build_report(samples, cfg.data, time.perf_counter() - t0)
    if out_dir is not None:
        write_report(report, out_dir)
    write_report(report, manifest_dir(cfg.data, cfg.paths.cache_dir))
    return report


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
@user_errors_exit
@one_run_per_folder(hint="rerun the same command to continue: the clips prepared so far are "
                    "kept in {cache_dir}")  # Ctrl-C / SIGTERM / disk full: one clear line
def main(cfg: DictConfig) -> None:
    """Preprocess ``cfg.data`` into the cache and write the prepare report."""
    check_or_exit(cfg)  # every problem of the config on stderr, exit 2, before any work
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    report = prepare(cfg, out_dir)
    if report.get("kind") == "long_videos":
        stats = report["stats"]
        log.info("prepared %d long videos (%d frames, %d chunks computed) of %s in %.1f s; "
                 "report: %s", stats["videos"], stats["frames"], stats["chunks_computed"],
                 cfg.data.name, report["seconds"]["total"], out_dir / "prepare_report.md")
        return
    log.info("prepared %d samples of %s (%d excluded) in %.1f s; report: %s",
             report["samples"], cfg.data.name, len(report["excluded"]),
             report["seconds"]["total"], out_dir / "prepare_report.md")
    print(OmegaConf.to_yaml(OmegaConf.create({"counts": report["counts"]})))


if __name__ == "__main__":
    main()
