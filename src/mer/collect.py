"""``python -m mer.collect DIR [DIR ...]``: one table from many runs.

Finds every ``results.json`` under the given folders (a Hydra multirun/sweep folder, SLURM
array outputs, single runs). Runs that differ only in ``protocol.fold_index`` (one LOSO fold
per job) are pooled into one result, scored once on their pooled predictions, and checked:
every fold present exactly once. Federated runs give one row each: rule, clients, the final
pooled global and personalised UF1/UAR, and the pooled/local baselines of the same run (with
``protocol.repeats`` > 1, the mean over seeds and its standard deviation).

Each row also gives the network's trainable parameter count (``params``, built from the run's
model config) and, for recognition runs, the mean training seconds per fold (``s_per_fold``,
from the runs' ``timings.folds_s``; resumed folds count with the seconds of their first run).

A run folder that Hydra started (it holds ``.hydra/``) but that has no ``results.json`` (a
job killed, failed or still running) is never dropped: it gets a row of its own with ``status``
``unfinished`` (or ``running``, while a live run holds its ``.mer.lock``) and its folder in
``run``, and a warning on stderr; finished rows have ``status`` ``ok``.

Writes ``summary.csv`` and ``summary.md`` (to ``--out``, default the first folder) and prints
the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from mer.data.io import atomic_write_text, atomic_write_with
from mer.engine.report import score_predictions


class CollectError(ValueError):
    """Runs that cannot be pooled (a fold twice, mixed class lists...)."""


def _group_key(results: dict) -> str:
    cfg = json.loads(json.dumps(results["config"]))
    cfg.get("protocol", {}).pop("fold_index", None)
    cfg.pop("resume", None)
    cfg.pop("progress", None)
    return json.dumps(cfg, sort_keys=True)


def _overrides(run_dir: Path) -> str:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return ""
    lines = [ln[2:].strip() for ln in path.read_text().splitlines() if ln.startswith("- ")]
    return " ".join(ln for ln in lines if not ln.startswith("protocol.fold_index"))


def parameter_count(model_cfg: dict, num_classes: int, in_channels: int = 3) -> int:
    """Trainable parameters of the network a model config builds (``num_classes`` outputs)."""
    from mer.models.registry import create_model

    net = create_model(model_cfg["name"], num_classes=num_classes, in_channels=in_channels,
                       **(model_cfg.get("kwargs") or {}))
    return int(sum(p.numel() for p in net.parameters() if p.requires_grad))


def _federated_row(run_dir: Path, results: dict) -> dict:
    fed, cfg = results["federated"], results["config"]
    row = {"name": results["name"], "overrides": _overrides(run_dir),
           "model": cfg["model"]["name"], "data": cfg["data"]["name"],
           "synthetic": results["synthetic"], "federated": cfg["federated"]["name"],
           "rule": cfg["federated"]["rule"]["name"], "clients": len(fed["clients"]),
           "protocol": fed["protocol"]["kind"], "rounds": cfg["federated"]["rounds"]}
    summary = (fed.get("repeats") or {}).get("summary")
    base = fed.get("baselines") or {}
    kinds = {"global": fed["final"].get("pooled_global"),
             "personalised": fed["final"].get("pooled_personalised"),
             "pooled": base.get("pooled_pooled"), "local": base.get("pooled_local")}
    for kind, m in kinds.items():
        if m is None:
            continue
        if summary:  # mean ± std over seeds
            s = summary[kind if kind in ("global", "personalised") else f"baseline_{kind}"]
            row[f"{kind}_uf1"] = round(s["uf1"]["mean"], 4)
            row[f"{kind}_uf1_std"] = round(s["uf1"]["std"], 4)
            row[f"{kind}_uar"] = round(s["uar"]["mean"], 4)
        else:
            row[f"{kind}_uf1"], row[f"{kind}_uar"] = round(m["uf1"], 4), round(m["uar"], 4)
    row["n"] = fed["final"]["pooled_global"]["n"]
    row["params"] = parameter_count(cfg["model"], len(results["data"]["class_names"]))
    row["seconds"] = round(results["timings"]["federated_s"], 1)
    return row


def _read_results(path: Path) -> dict:
    """A run's results.json; CollectError naming it when it is not a finished run's."""
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CollectError(f"{path} cannot be read ({e}): the run did not finish writing it "
                           "(results.json is written last). Rerun that run with resume=true, "
                           "or delete its folder to leave it out.") from e
    if not isinstance(results, dict) or "config" not in results:
        raise CollectError(f"{path} is not a mer results.json (no 'config'): move it out of "
                           "the folders being collected")
    return results


def _unfinished_row(run_dir: Path) -> dict:
    """The row of a run folder Hydra started (``.hydra/``) that holds no results.json."""
    import yaml

    from mer.engine.runlock import live_holder

    name = run_dir.name
    try:
        cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()) or {}
        name = cfg.get("name") or name
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError):
        pass
    holder = live_holder(run_dir)
    status = "running" if holder else "unfinished"
    return {"name": str(name), "overrides": _overrides(run_dir), "status": status,
            "run": str(run_dir), "complete": False,
            "note": f"pid {holder.get('pid')} since {holder.get('started')}" if holder else
            "no results.json"}


def _started_runs(root: Path) -> list[Path]:
    """Run folders under ``root`` that Hydra started: those holding a ``.hydra/`` folder."""
    return sorted(p.parent for p in Path(root).rglob(".hydra") if p.is_dir())


def collect(paths: list[Path]) -> pd.DataFrame:
    """One row per distinct experiment: pooled UF1/UAR/accuracy, folds, completeness; one
    row per federated run; one row per run folder without results.json (status
    ``unfinished`` or ``running``, each also warned about on stderr)."""
    groups: dict[str, list[tuple[Path, dict]]] = {}
    rows = []
    unfinished = []
    for root in paths:
        for path in sorted(Path(root).rglob("results.json")):
            results = _read_results(path)
            if "federated" in results:
                with _named(path):
                    row = _federated_row(path.parent, results)
                rows.append({**row, "status": "ok", "run": str(path.parent)})
            else:
                groups.setdefault(_group_key(results), []).append((path.parent, results))
        unfinished += [_unfinished_row(run) for run in _started_runs(Path(root))
                       if not (run / "results.json").exists()]
    for row in unfinished:
        print(f"mer.collect: warning: {row['run']} has no results.json ({row['status']}"
              + (f", {row['note']}" if row["status"] == "running" else ": the run was "
                 "killed, failed or is still running; rerun it with resume=true, or delete "
                 "the folder to leave it out") + "); listed as "
              f"'{row['status']}', left out of the figures", file=sys.stderr, flush=True)
    if not groups and not rows:
        listed = "".join(f"\n  {r['run']} ({r['status']})" for r in unfinished)
        raise CollectError(f"no results.json under {', '.join(map(str, paths))}"
                           + (f"; run folders that never finished (no results.json):{listed}"
                              if unfinished else ""))
    for runs in groups.values():
        with _named(runs[0][0] / "results.json"):
            rows.append(_group_row(runs))
    rows += unfinished
    return pd.DataFrame(rows).sort_values(["name", "overrides", "status"]) \
        .reset_index(drop=True)


PREDICTION_COLUMNS = ("fold", "clip", "label", "prediction")


def _read_predictions(path: Path) -> pd.DataFrame:
    """A run's predictions.csv; CollectError naming it when it cannot be read."""
    try:
        pred = pd.read_csv(path, dtype={"subject": str})
    except (OSError, UnicodeDecodeError, ValueError) as e:  # pandas' ParserError is one
        raise CollectError(f"{path} cannot be read ({type(e).__name__}: {e}): rerun that run "
                           "(resume=true reuses its finished folds), or delete its folder to "
                           "leave it out") from e
    missing = [c for c in PREDICTION_COLUMNS if c not in pred.columns]
    if missing:
        raise CollectError(f"{path} lacks the column(s) {missing} of mer's predictions.csv: "
                           "rerun that run, or delete its folder to leave it out")
    return pred


@contextlib.contextmanager
def _named(results_path: Path) -> Iterator[None]:
    """A results.json of another shape (an older mer's, edited by hand): CollectError naming
    it and the key it lacks, never a KeyError."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise CollectError(f"{results_path} lacks what mer.collect reads ({type(e).__name__}: "
                           f"{e}): it was not written by this version of mer.run, or was "
                           "edited; rerun that run, or move it out of the folders being "
                           "collected") from e


def _group_row(runs: list[tuple[Path, dict]]) -> dict:
    """The row of the runs of one recognition experiment (one, or one per LOSO fold job)."""
    first_dir, first = runs[0]
    classes = first["data"]["class_names"]
    preds = []
    for run_dir, results in runs:
        if results["data"]["class_names"] != classes:
            raise CollectError(f"{run_dir}: class list differs from {first_dir}")
        if not (run_dir / "predictions.csv").exists():
            raise CollectError(f"{run_dir} has results.json but no predictions.csv: "
                               "rerun it, or delete the folder to leave it out")
        preds.append(_read_predictions(run_dir / "predictions.csv"))
    pooled = pd.concat(preds, ignore_index=True)
    fold_sizes = pooled.groupby("fold")["clip"].count()
    per_run = pd.concat([p.drop_duplicates("fold")[["fold"]] for p in preds])
    twice = per_run["fold"][per_run["fold"].duplicated()].tolist()
    if twice:
        raise CollectError(f"fold(s) {twice} appear in more than one run of the same "
                           f"experiment (e.g. {first_dir}); remove the duplicate run")
    m = score_predictions(pooled, classes)["overall"]
    total = first["protocol"].get("total_folds", len(fold_sizes))
    fold_seconds = [s for _, r in runs for s in
                    ((r.get("timings") or {}).get("folds_s") or {}).values()]
    return {
        "name": first["name"], "overrides": _overrides(first_dir),
        "model": first["config"]["model"]["name"], "data": first["config"]["data"]["name"],
        "synthetic": first["synthetic"], "runs": len(runs), "folds": len(fold_sizes),
        "complete": len(fold_sizes) == total, "n": m["n"], "uf1": round(m["uf1"], 4),
        "uar": round(m["uar"], 4), "accuracy": round(m["accuracy"], 4),
        "params": parameter_count(first["config"]["model"], len(classes)),
        "s_per_fold": round(float(sum(fold_seconds) / len(fold_seconds)), 2)
        if fold_seconds else None, "status": "ok",
        "run": str(first_dir) if len(runs) == 1 else
        os.path.commonpath([str(d) for d, _ in runs]),
    }


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run or sweep folders")
    parser.add_argument("--out", type=Path, help="where to write summary.csv/.md")
    args = parser.parse_args(argv)
    out = args.out or args.dirs[0]
    if out.exists() and not out.is_dir():
        raise CollectError(f"--out {out} is a file, not a folder: give a folder for "
                           "summary.csv and summary.md")
    table = collect(args.dirs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from mer.data.io import describe_write_error

        raise (describe_write_error(out, e) or e) from e
    atomic_write_with(out / "summary.csv", lambda f: table.to_csv(f, index=False))
    atomic_write_text(out / "summary.md", table.to_markdown(index=False) + "\n")
    print(table.to_markdown(index=False))
    return table


if __name__ == "__main__":
    from mer.cli import user_errors_exit

    user_errors_exit(main)()
