"""Benchmark driven generation (``DrivenGenerator.generate_many``): one process vs a pool.

Each of the first ``--clips`` SynME clips is driven by itself and ``--drivers - 1`` other
clips of its class and rendered on another subject's face (as ``data.augment.generate``
does), three times, each into an empty folder except the last:

1. one process (``workers=1``): driving flows (TV-L1) then renders, in this process;
2. pool (``--workers``): the same jobs, flows then renders in a pool of image workers;
3. done: the pool again over the folder of 2 (every sequence found finished).

Reports sequences per second, the pool's speed-up, and the largest pixel difference between
1 and 2 (JPEG levels; torch's thread count may move a warp by ~1e-6 px). Wall-clock figures
need idle cores: the load average is printed before and after.

    python scripts/bench_generate.py                       # default SynME, 60 clips
    python scripts/bench_generate.py --preset tiny --clips 12 --workers 2
    farm-bench -n 3 --vs 'python scripts/bench_generate.py --only one' -- \
        python scripts/bench_generate.py --only pool      # whole processes, paired
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["default", "tiny"], default="default")
    parser.add_argument("--clips", type=int, default=60)
    parser.add_argument("--drivers", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", choices=["one", "pool"], default=None,
                        help="run just one process or just the pool (to time from outside)")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from mer.data.generate.augment import clip_ids, clips_of
    from mer.data.generate.generator import DrivenGenerator, GenerateParams
    from mer.data.sources import load_samples
    from mer.run import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"data.preset={args.preset}"])
    samples = load_samples(cfg.data, cfg.paths.cache_dir)  # untimed (cached after a first run)
    clips, ids = clips_of(samples), clip_ids(samples.meta)
    labels, subjects = samples.meta["label"].to_numpy(), samples.meta["subject_key"].to_numpy()
    jobs = []
    for i in range(min(args.clips, len(ids))):
        same = [ids[j] for j in np.flatnonzero(labels == labels[i]) if j != i]
        others = np.flatnonzero(subjects != subjects[i])  # another subject's face
        source = ids[int(others[i % len(others)])]
        jobs.append((ids[i], source, [ids[i], *same[: args.drivers - 1]]))
    params = GenerateParams(drivers=args.drivers, phases=5, frames=9)

    print(f"SynME {args.preset}: {len(jobs)} driven sequences, {args.drivers} drivers each; "
          f"load average before {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        timings, made = {}, {}
        runs = [("one process", 1, "one"), (f"pool of {args.workers}", args.workers, "pool"),
                ("done (pool)", args.workers, "pool")]
        if args.only:
            runs = [runs[0] if args.only == "one" else runs[1]]
        for name, workers, folder in runs:
            gen = DrivenGenerator(clips, params, Path(tmp) / folder, samples.class_names)
            start = time.perf_counter()
            made[name] = gen.generate_many(jobs, workers=workers, progress=False)
            timings[name] = time.perf_counter() - start
            print(f"{name:>14}: {timings[name]:8.1f} s  {len(jobs) / timings[name]:7.2f} "
                  "sequences/s")
        if args.only:
            return
        worst = 0
        for a, b in zip(made["one process"], made[f"pool of {args.workers}"], strict=True):
            for k in range(1, params.frames + 1):
                fa = cv2.imread(str(Path(a["folder"]) / f"img{k}.jpg")).astype(int)
                fb = cv2.imread(str(Path(b["folder"]) / f"img{k}.jpg")).astype(int)
                worst = max(worst, int(np.abs(fa - fb).max()))
    pool = timings[f"pool of {args.workers}"]
    print(f"speed-up of the pool: {timings['one process'] / pool:.2f}x; largest pixel "
          f"difference one process vs pool: {worst}; load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
