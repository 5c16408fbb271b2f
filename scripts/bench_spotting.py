"""Benchmark spotting: long-video preparation (frames/s, peak memory) and spotting inference.

``--part prepare``: a SynME-LV video (default 10 minutes at 200 fps, the SAMM-LV-like database
of the ``default`` preset: 120 000 frames) is rendered frame by frame on the fly (never written,
never held whole) and streamed through the long-video preprocessing of ``mer.prepare``
(landmark tracking with re-detection, ROI flow t -> t + k, head motion removed, 32 x 32 crops);
the features are written chunk by chunk as the cache does. Reported: frames per second end to
end and without the rendering, and the resident memory (RSS) at 10 %, 50 % and 100 % of the
video plus its peak, which stay flat however long the video is (a 30-minute video:
``--minutes 30``). Figures come from synthetic data (SynME-LV).

``--part inference``: spotting inference speed per spotter (``mer.spotting``): each spotter is
fitted briefly on a short synthetic feature video (weights untrained beyond one epoch: speed does
not depend on them), then scores a video of ``--minutes`` at ``--fps`` whose features have the
shapes of the long-video cache (13 ROIs, 32 x 32 crops); reported in source frames per second
(MESFusion's figure includes its dense flow on the crops). ``--threads`` torch threads.

    python scripts/bench_spotting.py --part prepare                  # 10 min at 200 fps
    python scripts/bench_spotting.py --part prepare --minutes 2 --json out.json
    python scripts/bench_spotting.py --part inference --minutes 10 --fps 200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def rss_mib() -> float:
    """Current resident memory of this process, MiB (Linux /proc; else the peak so far)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mib()


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def bench_prepare(minutes: float, fps: int, out_dir: Path, seed: int = 0) -> dict:
    """Stream one synthetic video of ``minutes`` through long-video preprocessing."""
    import dataclasses

    from omegaconf import OmegaConf

    from mer.data.preprocess.longvideo import (
        FeatureStream,
        LongVideoParams,
        _write_dir,
        iter_chunks,
    )
    from mer.data.synthetic_lv import SynMELVConfig, VideoRenderer, long_plan, video_landmarks

    spec = SynMELVConfig.preset("default").select(["samm_lv"]).databases[0]
    spec = dataclasses.replace(spec, fps=fps)
    plan = long_plan(spec, minutes, seed)
    conf = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/data/synme_lv.yaml")
    params = LongVideoParams.from_data_cfg(conf)
    n = plan["n_frames"]
    renderer = VideoRenderer(plan)
    render_seconds = 0.0
    checkpoints = {max(1, n // 10): "10%", max(1, n // 2): "50%", n: "100%"}
    rss: dict[str, float] = {"start": rss_mib()}

    def frames():
        nonlocal render_seconds
        for number in range(1, n + 1):
            t = time.perf_counter()
            frame = renderer.frame(number)
            render_seconds += time.perf_counter() - t
            if number in checkpoints:
                rss[checkpoints[number]] = rss_mib()
            yield number, frame

    stream = FeatureStream(fps, params, lambda number, grey: video_landmarks(plan, number),
                           "bench")
    t0 = time.perf_counter()
    written = 0
    for c, arrays in enumerate(iter_chunks(stream.run(frames()), params)):
        _write_dir(out_dir / f"chunk_{c:05d}", arrays, {"chunk": c})
        written += len(arrays["flow"])
    total = time.perf_counter() - t0
    assert written == n, (written, n)
    return {
        "synthetic": True, "video": f"SynME-LV samm_lv-like, {minutes:g} min at {fps} fps",
        "frames": n, "frame_size": [plan["height"], plan["width"]], "k": params.k(fps),
        "params": json.loads(params.key()),
        "seconds": {"total": total, "render": render_seconds,
                    "prepare": total - render_seconds},
        "frames_per_second": {"end_to_end": n / total,
                              "prepare_only": n / max(total - render_seconds, 1e-9)},
        "detections": len(stream.detections), "tracking_lost": len(stream.lost),
        "rss_mib": rss, "peak_rss_mib": peak_rss_mib(),
        "load_average": os.getloadavg(),
    }


def _feature_video(seconds: float, fps: float, seed: int, name: str, subject: str):
    """A SpotVideo with cache-shaped features: noise plus out-and-back bumps at known
    intervals (micro 0.3 s, macro 1.5 s) written as its ground truth."""
    import numpy as np
    import pandas as pd

    from mer.spotting.videos import GT_COLUMNS, SpotVideo

    rng = np.random.default_rng(seed)
    t, k = int(seconds * fps), max(1, int(round(0.2 * fps)))
    flow = rng.normal(0, 0.05, (t, 13, 2)).astype(np.float32)
    rows = []
    for i, start in enumerate(range(int(fps), t - int(3 * fps), int(4 * fps))):
        kind = "micro" if i % 2 == 0 else "macro"
        n = int((0.3 if kind == "micro" else 1.5) * fps)
        prof = np.sin(np.linspace(0, np.pi, n))
        flow[start:start + n, 2 + i % 6, 0] += np.gradient(prof).astype(np.float32) * 20
        rows.append([start + 1, start + n // 2 + 1, start + n, kind, "negative", (), i])
    crops = rng.integers(0, 255, (t, 32, 32), dtype=np.uint8)
    return SpotVideo(video=f"bench/{name}", database="bench", subject=subject, fps=fps, k=k,
                     frame_numbers=np.arange(1, t + 1), flow=flow, crops=crops,
                     magnitude=np.abs(flow).mean((1, 2)), roi_names=[f"r{i}" for i in range(13)],
                     gt=pd.DataFrame(rows, columns=GT_COLUMNS))


def bench_inference(minutes: float, fps: float, threads: int | None = None) -> dict:
    """Frames per second of each spotter's scoring of a ``minutes`` video at ``fps``."""
    import torch

    from mer.spotting import mesfusion
    from mer.spotting.registry import SPOTTERS, create_spotter, list_spotters

    if threads:
        torch.set_num_threads(threads)
    train = [_feature_video(20.0, fps, s, f"train{s}", f"s{s}") for s in range(4)]
    test = _feature_video(60.0 * minutes, fps, 99, "test", "s99")
    out = {"video": f"{minutes:g} min at {fps:g} fps ({test.length} frames), synthetic "
                    "features", "threads": torch.get_num_threads(), "spotters": {}}
    for name in list_spotters():
        short = {"epochs": 1} if SPOTTERS[name].learned else {}
        spotter = create_spotter({"name": name, **short}, seed=0).fit(train)
        mesfusion._FLOW_CACHE.clear()
        t0 = time.perf_counter()
        video, scores = spotter.scores(test)
        spotter.intervals(video, scores, spotter.thresholds)
        seconds = time.perf_counter() - t0
        out["spotters"][name] = {"seconds": seconds, "frames_per_second": test.length / seconds,
                                 "positions": video.length,
                                 "positions_per_second": video.length / seconds}
    out["load_average"] = list(os.getloadavg())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["prepare", "inference", "all"], default="all")
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="length of the synthetic video for --part prepare (default 10)")
    parser.add_argument("--fps", type=int, default=200, help="its frame rate (default 200)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for --part inference (default: torch's)")
    args = parser.parse_args()
    results: dict = {}
    if args.part in ("prepare", "all"):
        with tempfile.TemporaryDirectory(prefix="bench_spotting_") as tmp:
            results["prepare"] = r = bench_prepare(args.minutes, args.fps, Path(tmp))
        fps = r["frames_per_second"]
        print(f"prepare ({r['video']}, synthetic): {r['frames']} frames in "
              f"{r['seconds']['total']:.1f} s -> {fps['end_to_end']:.0f} frames/s end to end, "
              f"{fps['prepare_only']:.0f} frames/s without rendering; RSS MiB "
              + ", ".join(f"{k} {v:.0f}" for k, v in r["rss_mib"].items())
              + f"; peak {r['peak_rss_mib']:.0f} MiB (load average {r['load_average'][0]:.1f})")
    if args.part in ("inference", "all"):
        results["inference"] = r = bench_inference(args.minutes, args.fps, args.threads)
        print(f"inference ({r['video']}, {r['threads']} threads, load average "
              f"{r['load_average'][0]:.1f}):")
        for name, m in r["spotters"].items():
            print(f"  {name:11s} {m['frames_per_second']:10.0f} frames/s "
                  f"({m['positions_per_second']:.0f} positions/s, {m['seconds']:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
