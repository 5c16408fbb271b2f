"""Benchmark ``mer.prepare``'s pipeline on SynME: parallel + cached vs a plain sequential loop.

Side by side in one run, on the same clips and the same algorithms (face + landmarks,
alignment, TV-L1 flow, strain, resize):

1. plain: ``for row in table: prepare_clip(row)`` in this process (OpenCV's default threads);
2. cold: ``prepare_table`` with ``--workers`` processes and an empty cache (start-up included);
3. cached: the same again, every clip found in the cache.

Reports clips per second, the speed-up of cold over plain, cached time as % of cold, and
checks that all three give the same flow images. Wall-clock figures need otherwise idle
cores: the load average before and after, and the CPU seconds of each run (this process plus
its workers), are printed so that a run on a busy machine can be recognised as such.

    python scripts/bench_prepare.py                       # default SynME (~230 clips)
    python scripts/bench_prepare.py --preset tiny --workers 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def synme_table(preset: str, cache_dir: Path) -> pd.DataFrame:
    """Sample table of a SynME preset, generated (untimed) into ``cache_dir``."""
    from mer.data.databases.casme2 import read_casme2
    from mer.data.synthetic import default_synme_config, ensure_synme, tiny_synme_config

    syn = {"default": default_synme_config, "tiny": tiny_synme_config}[preset](0)
    root = ensure_synme(syn, cache_dir / "synme", workers=os.cpu_count() or 1)
    tables = []
    for spec in syn.databases:
        t, _ = read_casme2(root / spec.name, database=spec.name)
        t["fps"] = float(spec.fps)
        tables.append(t)
    return pd.concat(tables, ignore_index=True)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children so far."""
    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["default", "tiny"], default="default")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes for the parallel prepare (default: all cores)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N clips")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where SynME is generated (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    from mer.data.preprocess.cache import FlowCache
    from mer.data.preprocess.prepared import PrepareParams, prepare_clip, prepare_table

    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        cache_dir = args.cache_dir or Path(tmp)
        table = synme_table(args.preset, cache_dir)
        if args.limit:
            table = table.iloc[:args.limit].reset_index(drop=True)
        n = len(table)
        params = PrepareParams()
        clips = FlowCache(Path(tmp) / "clips")

        load_before = os.getloadavg()[0]
        c0, t0 = cpu_seconds(), time.perf_counter()
        plain = np.stack([prepare_clip(row, params)["flow"] for row in table.to_dict("records")])
        t_plain, c_plain = time.perf_counter() - t0, cpu_seconds() - c0

        c0, t0 = cpu_seconds(), time.perf_counter()
        cold = prepare_table(table, params, clips, workers=args.workers, progress=False)
        t_cold, c_cold = time.perf_counter() - t0, cpu_seconds() - c0

        t0 = time.perf_counter()
        warm = prepare_table(table, params, FlowCache(clips.root), workers=args.workers,
                             progress=False)
        t_warm = time.perf_counter() - t0

    figures = {
        "clips": n, "workers": args.workers, "cpu_count": os.cpu_count(),
        "plain_s": t_plain, "cold_s": t_cold, "cached_s": t_warm,
        "plain_cpu_s": c_plain, "cold_cpu_s": c_cold,
        "load_average_before_after": [load_before, os.getloadavg()[0]],
        "plain_clips_per_s": n / t_plain, "cold_clips_per_s": n / t_cold,
        "speedup_cold_vs_plain": t_plain / t_cold, "cached_pct_of_cold": 100 * t_warm / t_cold,
        "cached_hits": warm.hits, "max_abs_diff": float(max(np.abs(cold.x - plain).max(),
                                                            np.abs(warm.x - plain).max())),
        "stage_seconds_cold": cold.stage_seconds,
    }
    print(f"SynME {args.preset}: {n} clips, {args.workers} workers, {os.cpu_count()} cores")
    print(f"{'run':<28}{'seconds':>10}{'clips/s':>10}{'CPU s':>10}")
    print(f"{'plain sequential loop':<28}{t_plain:>10.2f}{n / t_plain:>10.2f}{c_plain:>10.1f}")
    print(f"{'prepare, cold cache':<28}{t_cold:>10.2f}{n / t_cold:>10.2f}{c_cold:>10.1f}")
    print(f"{'prepare, cached re-run':<28}{t_warm:>10.2f}{n / t_warm:>10.2f}")
    print(f"speed-up cold vs plain: {t_plain / t_cold:.2f}x; cached re-run: "
          f"{100 * t_warm / t_cold:.1f}% of cold; max |difference| {figures['max_abs_diff']:.2g}")
    print(f"load average (1 min) before {load_before:.1f}, after {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
