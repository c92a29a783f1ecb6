"""Quality benchmark: K-means baseline vs PriMaPs-EM (`stats`, `gradient`) on generated texture mosaics.

For every feature layer and seed, one training run per EM mode (``python -m primaps_dist.train``, one
process, one run at a time, each in its own subprocess). A run's final evaluation reports both the K-means
baseline (the prototypes at the end of the K-means stage) and PriMaPs-EM, on the validation split, with the
final checkpoint (no selection on labels). The K-means stage does not depend on the EM mode (same seed, same
stream, same arithmetic), so the baseline is read from the first mode's run of each (layer, seed) and the
other runs' baselines are checked against it (``baseline_max_diff`` in the JSON; expected 0).

Output: ``<out>/quality.json`` (every run and the aggregates) and ``<out>/quality.md`` (mean +- sample std
over seeds of mIoU and pixel accuracy, in percent, per method x layer), also printed.

    python bench/bench_quality.py --out bench_out/quality                   # full grid: 12 runs
    python bench/bench_quality.py --out bench_out/quality --quick           # 1 seed, layer 3, 20 EM steps: 2 runs
    python bench/bench_quality.py --out bench_out/photos2 --source photos2  # the second set (5 other classes)

Run time on 2 CPU cores: about 1 min per run when the cores are free (full grid ~13 min, --quick ~2 min);
measured 43 min for the full grid on cores shared with other jobs (load 6-8).
    python bench/bench_quality.py --out q --seeds 0 1 --layers 3 2,3 --em-steps 80 --set proposals.max_masks=8

Data (``make-demo-data --source SOURCE`` defaults + shards) is generated under ``--data`` when it is missing;
``--source`` picks the mosaics: ``demo`` (6 classes, the default) or ``photos2`` (5 classes from other photos,
a second evaluation set; ``data.num_classes`` follows its classes.json). Settings not given here come from
``--config`` (default configs/demo.yaml).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("kmeans", "stats", "gradient")
LABELS = {"kmeans": "K-means baseline", "stats": "PriMaPs-EM (stats)", "gradient": "PriMaPs-EM (gradient, ddp)"}
SOURCES = {"demo": "Demo mosaics (6 classes)", "photos2": "photos2 mosaics (5 classes, second set)"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (runs, quality.json, quality.md)")
    parser.add_argument("--data", default="", help="data directory (default: <out>/data)")
    parser.add_argument("--source", default="demo", choices=sorted(SOURCES),
                        help="make-demo-data source set: demo (default) or photos2")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--layers", nargs="+", default=["3", "2,3"],
                        help="backbone.layers per setting, comma separated stage indices (e.g. 3 2,3)")
    parser.add_argument("--modes", nargs="+", default=["stats", "gradient"], choices=["stats", "gradient"])
    parser.add_argument("--kmeans-steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--em-steps", type=int, default=40, help="PriMaPs-EM steps per run (default 40)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra section.key=value override for every run (repeatable)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: seed 0, layer 3, kmeans 20 and em 20 steps (unless given)")
    parser.add_argument("--keep-going", action="store_true", help="record a failed run and continue")
    args = parser.parse_args(argv)
    if args.quick:
        defaults = parser.parse_args(["--out", "x"])
        if args.seeds == defaults.seeds:
            args.seeds = [0]
        if args.layers == defaults.layers:
            args.layers = ["3"]
        args.kmeans_steps = 20 if args.kmeans_steps is None else args.kmeans_steps
        args.em_steps = 20 if args.em_steps == defaults.em_steps else args.em_steps
    return args


def run_checked(command: list[str], env: dict[str, str], log_path: Path) -> None:
    with open(log_path, "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if result.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"command failed ({result.returncode}): {' '.join(command)}\n" + "\n".join(tail))


def data_source(data: Path) -> str | None:
    """The source set of the data under ``data`` (classes.json; made before --source existed: demo)."""
    classes = data / "images" / "classes.json"
    return json.loads(classes.read_text()).get("source", "demo") if classes.is_file() else None


def ensure_demo_data(data: Path, env: dict[str, str], source: str = "demo") -> tuple[Path, Path]:
    train, val = data / "shards" / "train", data / "shards" / "val"
    found = data_source(data)
    if found is not None and found != source:
        raise SystemExit(f"--data {data} holds the {found!r} set, not --source {source!r}; pass another --data")
    if (train / "index.json").is_file() and (val / "index.json").is_file():
        return train, val
    data.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "primaps_dist.cli"]
    run_checked(cli + ["make-demo-data", "--out", str(data / "images"), "--source", source], env,
                data / "make_demo_data.log")
    for split, shards in (("train", train), ("val", val)):
        run_checked(cli + ["make-shards", "--images", str(data / "images" / split / "images"),
                           "--labels", str(data / "images" / split / "labels"), "--out", str(shards),
                           "--shard-size", "32", "--classes", str(data / "images" / "classes.json")],
                    env, data / f"make_shards_{split}.log")
    return train, val


def train_run(args: argparse.Namespace, env: dict[str, str], shards: tuple[Path, Path], run_dir: Path,
              layers: str, seed: int, mode: str, num_classes: int | None) -> dict:
    """One training run; returns its baseline and EM scores (percent) and wall time."""
    overrides = [
        f"data.train_shards={shards[0]}", f"data.val_shards={shards[1]}", f"train.output_dir={run_dir}",
        f"train.seed={seed}", f"backbone.layers=[{layers}]", f"em.mode={mode}", "em.engine=ddp",
        "data.num_workers=0", "tracking.num_overlays=0", "checkpoint.every_steps=1000000", "checkpoint.resume=false",
    ]
    if mode == "gradient":  # a local MLflow file keeps the focal-weight spread of every logging step
        overrides += ["tracking.enabled=true", f"tracking.tracking_uri=sqlite:///{run_dir / 'mlflow.db'}",
                      "tracking.system_metrics=false", "tracking.experiment=bench-quality"]
    else:
        overrides.append("tracking.enabled=false")
    if num_classes is not None:
        overrides.append(f"data.num_classes={num_classes}")
    if args.kmeans_steps is not None:
        overrides.append(f"train.kmeans_steps={args.kmeans_steps}")
    if args.em_steps is not None:
        overrides.append(f"train.em_steps={args.em_steps}")
    overrides += args.overrides
    command = [sys.executable, "-m", "primaps_dist.train", "--config", args.config, *overrides]
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run_checked(command, env, run_dir / "train.log")
    seconds = time.perf_counter() - start
    em = json.loads((run_dir / "eval" / "metrics.json").read_text())
    base = json.loads((run_dir / "eval_kmeans_baseline" / "metrics.json").read_text())
    run = {"layers": layers, "seed": seed, "mode": mode, "seconds": round(seconds, 1),
           "baseline": {"miou": base["miou"], "accuracy": base["accuracy"]},
           "em": {"miou": em["miou"], "accuracy": em["accuracy"], "per_class_iou": em["per_class_iou"]}}
    if mode == "gradient":
        run["focal"] = focal_weight_history(run_dir / "mlflow.db")
    return run


FOCAL_KEYS = ("em/focal_weight_min", "em/focal_weight_max", "em/focal_weight_std", "em/head_gain_min",
              "em/head_gain_max")


def focal_weight_history(database: Path) -> dict[str, list[float]]:
    """``{metric: values at the EM logging steps}`` of a gradient run's MLflow file (FOCAL_KEYS)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{database}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    if len(runs) != 1:
        return {}
    history = {}
    for key in FOCAL_KEYS:
        points = sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda m: m.step)
        history[key] = [round(m.value, 4) for m in points]
    return history


def focal_summary(runs: list[dict]) -> list[str]:
    """Markdown lines: focal-weight spread and head gains of the gradient runs (first / last EM log step)."""
    lines = []
    for run in runs:
        focal = run.get("focal") or {}
        if not focal.get("em/focal_weight_std"):
            continue
        first, last = 0, -1
        lines.append(
            f"| [{run['layers']}] | {run['seed']} | "
            + " | ".join(f"{focal[k][first]:.3f} -> {focal[k][last]:.3f}" for k in FOCAL_KEYS) + " |"
        )
    if not lines:
        return []
    header = ["", "Gradient runs: focal class weights (1 - mean p_k)^2 and head gains, first -> last EM logging step.",
              "", "| layers | seed | weight min | weight max | weight std | gain min | gain max |",
              "|---|---|---|---|---|---|---|"]
    return header + lines


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: list[dict], layers_list: list[str], modes: list[str]) -> list[dict]:
    """Rows (method, layers) with per-seed scores and mean/std of miou and accuracy."""
    rows = []
    for layers in layers_list:
        mine = [r for r in runs if r["layers"] == layers and "error" not in r]
        baselines: dict[int, dict] = {}
        for run in mine:  # first mode's run of each seed gives the baseline
            baselines.setdefault(run["seed"], run["baseline"])
        per_method = {"kmeans": [baselines[s] for s in sorted(baselines)]}
        for mode in modes:
            per_method[mode] = [r["em"] for r in sorted(mine, key=lambda r: r["seed"]) if r["mode"] == mode]
        for method in ["kmeans", *modes]:
            scores = per_method[method]
            miou = mean_std([s["miou"] for s in scores])
            acc = mean_std([s["accuracy"] for s in scores])
            rows.append({"method": method, "layers": layers, "n": len(scores),
                         "miou_mean": miou[0], "miou_std": miou[1], "acc_mean": acc[0], "acc_std": acc[1],
                         "miou_per_seed": [s["miou"] for s in scores],
                         "acc_per_seed": [s["accuracy"] for s in scores]})
        # Paired gain over the baseline (same seed): removes the seed's share of the spread.
        for mode in modes:
            gains = [r["em"]["miou"] - baselines[r["seed"]]["miou"] for r in mine if r["mode"] == mode]
            row = next(x for x in rows if x["method"] == mode and x["layers"] == layers)
            row["miou_gain_mean"], row["miou_gain_std"] = mean_std(gains)
    return rows


def stride_of(layers: str) -> int:
    return 2 ** (min(int(x) for x in layers.split(",")) + 1)


def markdown(rows: list[dict], args: argparse.Namespace, runs: list[dict], wall: float) -> str:
    steps = f"kmeans_steps={args.kmeans_steps or 'config'}, em_steps={args.em_steps or 'config'}"
    lines = [
        f"{SOURCES[args.source]}, EfficientNet-Lite0 (offline), seeds {args.seeds}, {steps}"
        + (f", overrides {args.overrides}" if args.overrides else "") + ".",
        "mean +- sample std over seeds (percent); gain = paired mIoU gain over the same seed's baseline.",
        "",
        "| method | layers (stride) | mIoU | accuracy | mIoU gain | mIoU per seed |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        gain = ""
        if "miou_gain_mean" in row:
            gain = f"{row['miou_gain_mean']:+.1f} +- {row['miou_gain_std']:.1f}"
        seeds = ", ".join(f"{v:.1f}" for v in row["miou_per_seed"])
        lines.append(
            f"| {LABELS[row['method']]} | [{row['layers']}] (s{stride_of(row['layers'])}) | "
            f"{row['miou_mean']:.1f} +- {row['miou_std']:.1f} | {row['acc_mean']:.1f} +- {row['acc_std']:.1f} | "
            f"{gain} | {seeds} |"
        )
    lines += focal_summary(runs)
    failed = [r for r in runs if "error" in r]
    lines += ["", f"{len(runs) - len(failed)} runs, {len(failed)} failed, total wall time {wall / 60:.1f} min "
              f"(mean {statistics.fmean([r['seconds'] for r in runs if 'seconds' in r] or [0]):.0f} s per run)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    data = Path(args.data).resolve() if args.data else out / "data"
    shards = ensure_demo_data(data, env, args.source)
    classes = data / "images" / "classes.json"  # absent for shards made elsewhere: the config's num_classes
    num_classes = int(json.loads(classes.read_text())["num_classes"]) if classes.is_file() else None
    runs: list[dict] = []
    start = time.perf_counter()
    for layers in args.layers:
        for seed in args.seeds:
            for mode in args.modes:
                run_dir = out / "runs" / f"layers{layers.replace(',', '-')}_seed{seed}_{mode}"
                try:
                    run = train_run(args, env, shards, run_dir, layers, seed, mode, num_classes)
                except RuntimeError as err:
                    if not args.keep_going:
                        raise
                    run = {"layers": layers, "seed": seed, "mode": mode, "error": str(err)}
                runs.append(run)
                if "error" in run:
                    print(f"[{time.perf_counter() - start:6.0f} s] layers [{layers}] seed {seed} {mode}: FAILED",
                          flush=True)
                else:
                    print(f"[{time.perf_counter() - start:6.0f} s] layers [{layers}] seed {seed} {mode}: "
                          f"baseline {run['baseline']['miou']:.1f} / {run['baseline']['accuracy']:.1f}  "
                          f"EM {run['em']['miou']:.1f} / {run['em']['accuracy']:.1f}  (mIoU / acc, {run['seconds']:.0f} s)",
                          flush=True)
    wall = time.perf_counter() - start
    rows = aggregate(runs, args.layers, args.modes)
    baseline_diff = 0.0
    for layers in args.layers:
        for seed in args.seeds:
            same = [r["baseline"]["miou"] for r in runs if r["layers"] == layers and r["seed"] == seed and "error" not in r]
            if same:
                baseline_diff = max(baseline_diff, max(same) - min(same))
    report = {"settings": {k: v for k, v in vars(args).items()}, "runs": runs, "rows": rows,
              "baseline_max_diff": baseline_diff, "wall_s": round(wall, 1)}
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    table = markdown(rows, args, runs, wall)
    if baseline_diff > 1e-6:
        table += f"\nWARNING: the K-means baselines of one (layers, seed) differ between modes by {baseline_diff:.3f} mIoU.\n"
    (out / "quality.md").write_text(table)
    print(table)
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
