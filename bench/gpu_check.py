"""The GPU path in one command: CPU vs CUDA agreement, throughput per stage, memory, host syncs, training runs.

Usage:  python bench/gpu_check.py            (make gpu-check; needs CUDA; under 8 minutes on one GPU)
        python bench/gpu_check.py --dry      (CPU, tiny sizes, gloo: every stage runs, numbers mean nothing)

(a) agreement of the CUDA results with the CPU ones: ``mask_logits`` (ARI per image >= 0.99), the torch CRF
    (argmax agreement >= 99.5 % at downsample 1 and 4), the stats step (prototypes and statistics within
    1e-6), pseudo labels (pixel agreement >= 98 %: proposals may split near-ties differently);
(b) throughput per stage of one pseudo-label + M-step on DINO ViT-S/8 (timm, random weights: nothing is
    downloaded) at 320, batch 32, bf16 autocast: backbone, proposals, CRF, assembly, M-step; images/s and
    each stage's share, and the whole E-step as the trainer calls it (make_pseudo_labels + stats step);
(c) peak GPU memory per image of that step;
(d) host synchronisations per steady training step (``torch.cuda.set_sync_debug_mode``), by call site;
(e) a 1-process training run of the trainer (torchrun, NCCL configured) on synthetic shards: a few steps,
    checkpoints, then a resume to more steps; plus one NCCL all-reduce on a 1-rank group (with one process
    the trainer makes no process group);
(f) the same run with em.mode=gradient on the DeepSpeed engine (its own 1-rank NCCL group).

Prints progress on stderr and ONE JSON line on stdout at the end. A failed check prints
``gpu-check FAILED: ...`` on stderr and exits 1; no CUDA without ``--dry`` exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from primaps_dist.backbones import build_backbone
from primaps_dist.config import BackboneConfig, Config
from primaps_dist.crf import crf_from_config, dense_crf
from primaps_dist.data.synthetic import write_striped_shards
from primaps_dist.distributed import DistEnv
from primaps_dist.em.stats import PrototypeState, batch_stats, stats_step
from primaps_dist.ops import argmax_channels, upsample_logits
from primaps_dist.primaps import mask_logits
from primaps_dist.prototypes import nearest_prototype_upsampled
from primaps_dist.pseudo_labels import assemble, make_pseudo_labels
from primaps_dist.testing.crf_samples import sample_batch
from primaps_dist.testing.primaps_reference import adjusted_rand_index, planted_features
from primaps_dist.train import Trainer
from primaps_dist.train_state import load_train_state

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks (vendor datasheets, TFLOP/s) to put the backbone's rate in proportion.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
# DINO ViT-S/8 at 320 x 320: about 117 GFLOP per image (issue 13); other crops scale by pixels (approximate).
VITS8_GFLOP_AT_320 = 117.0
STAGES = ("agreement", "throughput", "syncs", "train")


@dataclass(frozen=True)
class Sizes:
    crop: int  # throughput crop (ViT-S/8: 320 -> 40 x 40 features)
    batch: int  # throughput batch
    repeats: int  # timed repeats per stage, after one warm-up
    agree_grid: int  # planted feature maps for the agreement checks: [agree_batch, agree_channels, grid, grid]
    agree_channels: int
    agree_batch: int
    crf_size: int  # CRF agreement images
    train_crop: int  # training runs (e, f) and the sync count (d)
    train_batch: int


FULL = Sizes(crop=320, batch=32, repeats=3, agree_grid=40, agree_channels=384, agree_batch=4, crf_size=320,
             train_crop=128, train_batch=4)
DRY = Sizes(crop=64, batch=2, repeats=1, agree_grid=12, agree_channels=32, agree_batch=2, crf_size=48,
            train_crop=64, train_batch=2)


def say(message: str) -> None:
    print(f"[gpu-check] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up; the last result."""
    result = fn()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


# ------------------------------------------------------------------------------------------ (a) agreement


def agreement_checks(device: torch.device, sizes: Sizes, limits: argparse.Namespace) -> dict[str, Any]:
    cpu = torch.device("cpu")
    features = planted_features(sizes.agree_batch, sizes.agree_channels, sizes.agree_grid, seed=0)
    reference = argmax_channels(mask_logits(features))
    on_device = argmax_channels(mask_logits(features.to(device))).cpu()
    ari = min(adjusted_rand_index(reference[b].numpy(), on_device[b].numpy()) for b in range(len(features)))

    logits, images = sample_batch(2, sizes.crf_size, labels=6)
    crf = {}
    for downsample in (1, 4):
        expected = dense_crf(logits, images, downsample=downsample).argmax(dim=1)
        got = dense_crf(logits.to(device), images.to(device), downsample=downsample).argmax(dim=1).cpu()
        crf[f"downsample_{downsample}"] = float((expected == got).float().mean())

    generator = torch.Generator().manual_seed(1)
    num_classes = 5
    rows = torch.randn(4, sizes.agree_channels, 10, 10, generator=generator)
    labels = torch.randint(0, num_classes, (4, 10, 10), generator=generator)
    labels[:, :2] = 255
    start = F.normalize(torch.randn(num_classes, sizes.agree_channels, generator=generator), dim=1)
    packed, states = {}, {}
    for name, where in (("reference", cpu), ("device", device)):
        packed[name] = batch_stats(rows.to(where), labels.to(where), num_classes).cpu()
        states[name] = PrototypeState.from_prototypes(start.to(where))
        stats_step(states[name], rows.to(where), labels.to(where), momentum=0.9)
    scale = float(packed["reference"].abs().max())
    stats_diff = max(float((packed["reference"] - packed["device"]).abs().max()) / scale,
                     float((states["reference"].prototypes - states["device"].prototypes.cpu()).abs().max()))

    _, photos = sample_batch(2, sizes.crf_size, labels=2)
    grid = sizes.crf_size // 8
    maps = planted_features(2, sizes.agree_channels, grid, seed=3)
    prototypes = F.normalize(torch.randn(num_classes, sizes.agree_channels, generator=generator), dim=1)
    crf_fn = crf_from_config(Config().crf)
    pseudo = {}
    for name, where in (("reference", cpu), ("device", device)):
        result = make_pseudo_labels(maps.to(where), (photos / 255.0).to(where), prototypes.to(where), crf_fn=crf_fn,
                                    label_size=(sizes.crf_size, sizes.crf_size))
        pseudo[name] = result.labels.cpu()
    pseudo_agreement = float((pseudo["reference"] == pseudo["device"]).float().mean())

    results = {"mask_logits_min_ari": ari, "crf_argmax_agreement": crf, "stats_max_difference": stats_diff,
               "pseudo_label_agreement": pseudo_agreement}
    failures = []
    if ari < limits.ari_min:
        failures.append(f"mask_logits ARI {ari:.4f} < {limits.ari_min}")
    for name, value in crf.items():
        if value < limits.crf_min:
            failures.append(f"CRF argmax agreement at {name} {value:.4f} < {limits.crf_min}")
    if stats_diff > limits.stats_tol:
        failures.append(f"stats step differs by {stats_diff:.2e} > {limits.stats_tol}")
    if pseudo_agreement < limits.pseudo_min:
        failures.append(f"pseudo-label agreement {pseudo_agreement:.4f} < {limits.pseudo_min}")
    results["failures"] = failures
    return results


# ------------------------------------------------------------------------------------------ (b, c) throughput


def throughput(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    cfg = Config()
    backbone = build_backbone(BackboneConfig(name="dino_vits8", weights="random", precision="bf16"), device)
    photos = sample_batch(min(sizes.batch, 4), sizes.crop, labels=2)[1] / 255.0
    images = photos.repeat((sizes.batch + len(photos) - 1) // len(photos), 1, 1, 1)[: sizes.batch].to(device)
    size = (cfg.proposals.label_size or sizes.crop,) * 2
    crf_fn = crf_from_config(cfg.crf)
    num_classes = cfg.data.num_classes
    prototypes = F.normalize(torch.randn(num_classes, backbone.out_channels), dim=1).to(device)
    proposal_args = dict(threshold=cfg.proposals.threshold, coverage=cfg.proposals.coverage,
                         max_masks=cfg.proposals.max_masks, median_filter=cfg.proposals.median_filter)
    state = PrototypeState.from_prototypes(prototypes)

    def e_and_m_step(features):
        """The trainer's E- and M-step (stats mode) on ``features``."""
        pseudo = make_pseudo_labels(features, images, prototypes, **proposal_args, crf_fn=crf_fn, label_size=size)
        grid = F.interpolate(pseudo.labels[:, None].float(), size=features.shape[-2:], mode="nearest-exact")
        return stats_step(state, features, grid[:, 0].long(), 0.98, check_labels=False)

    with torch.no_grad():
        peak_mib_per_image = None
        if device.type == "cuda":  # first, while only the weights and the images are held
            e_and_m_step(backbone(images))  # warm-up: allocator pools, kernels
            synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            e_and_m_step(backbone(images))
            synchronize(device)
            peak_mib_per_image = (torch.cuda.max_memory_allocated(device) - base) / 2**20 / sizes.batch
        seconds: dict[str, float] = {}
        seconds["backbone"], features = timed(lambda: backbone(images), device, sizes.repeats)
        seconds["proposals"], logits = timed(lambda: mask_logits(features, **proposal_args), device, sizes.repeats)
        scaled = (F.interpolate(images, size=size, mode="bilinear", antialias=True) * 255.0).clamp(0, 255)

        def crf_stage():
            return crf_fn(upsample_logits(logits, size, memory_format=torch.channels_last), scaled)

        seconds["crf"], probabilities = timed(crf_stage, device, sizes.repeats)

        def assembly():
            mask_ids = argmax_channels(probabilities)
            return assemble(mask_ids, nearest_prototype_upsampled(features, prototypes, size), num_classes)

        seconds["assembly"], labels = timed(assembly, device, sizes.repeats)
        grid_labels = F.interpolate(labels[:, None].float(), size=features.shape[-2:], mode="nearest-exact")
        grid_labels = grid_labels[:, 0].long()
        seconds["m_step"], _ = timed(lambda: stats_step(state, features, grid_labels, 0.98, check_labels=False),
                                     device, sizes.repeats)

        pipeline_s, _ = timed(lambda: e_and_m_step(backbone(images)), device, sizes.repeats)
    total = sum(seconds.values())
    tflops = VITS8_GFLOP_AT_320 * 1e9 * sizes.crop**2 / 320**2 * sizes.batch / seconds["backbone"] / 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((value for key, value in BF16_PEAK_TFLOPS.items() if key in name), None)
    return {
        "backbone": "dino_vits8 (random weights), bf16 autocast", "crop": sizes.crop, "batch": sizes.batch,
        "features": list(features.shape[1:]), "max_proposals_per_image": logits.shape[1] - 1,
        "stage_ms": {name: 1000 * value for name, value in seconds.items()},
        "stage_share": {name: value / total for name, value in seconds.items()},
        "images_per_s_stages": sizes.batch / total,
        "images_per_s_pipeline": sizes.batch / pipeline_s,
        "backbone_tflops": tflops,
        "bf16_peak_tflops": peak,
        "backbone_fraction_of_peak": tflops / peak if peak else None,
        "peak_memory_mib_per_image": peak_mib_per_image,  # above the weights and the input batch
    }


# ------------------------------------------------------------------------------------------ (d) host syncs


class NullTracker:
    def start(self, params=None, run_name=None) -> str:
        return ""

    def log_metrics(self, metrics, step) -> None:
        pass

    def log_artifact(self, path, artifact_path=None) -> None:
        pass

    def finish(self, status="FINISHED") -> bool:
        return True


def syncs_per_step(device: torch.device, sizes: Sizes, mode: str, out: Path) -> dict[str, Any]:
    """Steady EM steps of the in-process Trainer; CUDA sync warnings per step and their top call sites."""
    cfg = Config()
    cfg.data.num_classes, cfg.data.crop_size = 6, sizes.train_crop
    cfg.train.output_dir, cfg.train.log_every, cfg.checkpoint.every_steps = str(out), 1000, 1000
    cfg.train.pca_steps, cfg.train.kmeans_steps, cfg.train.em_steps = 1, 2, 4
    cfg.em.mode, cfg.tracking.enabled = mode, False
    cfg.validate()
    backbone = build_backbone(BackboneConfig(name="dino_vits8", weights="random", precision="bf16"), device)
    photos = sample_batch(sizes.train_batch, sizes.train_crop, labels=2)[1] / 255.0
    steps = cfg.train.pca_steps + cfg.train.kmeans_steps + cfg.train.em_steps
    caught: list[warnings.WarningMessage] = []
    marks: list[int] = []

    def sync_warnings() -> list[warnings.WarningMessage]:
        return [record for record in caught if "synchroniz" in str(record.message)]

    def loader():
        for _ in range(steps):
            marks.append(len(sync_warnings()))  # a step boundary: the trainer takes one batch per step
            yield {"image": photos}

    trainer = Trainer(cfg, DistEnv(device=device), backbone=backbone, loader=loader(), tracker=NullTracker())
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            caught = records
            trainer.run()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    marks.append(len(sync_warnings()))
    per_step = [after - before for before, after in zip(marks, marks[1:])]
    first_em = cfg.train.pca_steps + cfg.train.kmeans_steps
    sites = Counter(f"{r.filename.removeprefix(str(REPO) + os.sep)}:{r.lineno}" for r in sync_warnings())
    counted = device.type == "cuda"
    return {
        "counted": counted,  # set_sync_debug_mode works on CUDA only; the dry run just exercises the steps
        "kmeans_step": per_step[cfg.train.pca_steps] if counted else None,
        "em_steady_steps": per_step[first_em + 1 : -1] if counted else None,
        "top_sites": sites.most_common(12) if counted else [],
    }


# ------------------------------------------------------------------------------------------ (e, f) training runs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def training_run(device: torch.device, sizes: Sizes, shards: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    """torchrun, 1 process: a few steps with a checkpoint each step, then a resume to two more EM steps.
    The dry run starts ``python -m primaps_dist.train`` without torchrun (same single process, one import
    of torch fewer per run)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    common = [
        "--config", str(REPO / "configs/demo.yaml"), f"data.train_shards={shards}", "data.val_shards=",
        f"data.crop_size={sizes.train_crop}", f"data.batch_size={sizes.train_batch}", "data.num_workers=0",
        "train.pca_steps=1", "train.kmeans_steps=1", f"train.output_dir={out}", "train.log_every=1",
        "checkpoint.every_steps=1", f"train.device={device.type}", f"dist.backend={backend}",
        "proposals.max_masks=4", "proposals.label_size=0", "crf.iterations=2", "tracking.enabled=false",
        "tracking.system_metrics=false", "tracking.num_overlays=0", *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(REPO)}
    runs = []
    for em_steps in (2, 4):
        launcher = [] if device.type == "cpu" else [
            "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", f"--master_port={free_port()}"]
        command = [sys.executable, *launcher, "-m", "primaps_dist.train", *common, f"train.em_steps={em_steps}"]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        state = load_train_state(out) if done.returncode == 0 else None
        runs.append({"exit": done.returncode, "seconds": time.perf_counter() - start,
                     "final_step": state.step if state else None, "resumed": "resumed from" in done.stderr,
                     "error": done.stderr.strip().splitlines()[-1] if done.returncode else ""})
    failures = []
    first, second = runs
    if first["exit"] != 0 or first["final_step"] != 4:
        failures.append(f"training run {extra or ['stats']}: {first}")
    elif second["exit"] != 0 or second["final_step"] != 6 or not second["resumed"]:
        failures.append(f"resumed training run {extra or ['stats']}: {second}")
    return {"runs": runs, "failures": failures}


def one_rank_collective(device: torch.device) -> dict[str, Any]:
    """One all-reduce on a 1-rank NCCL (CUDA) / gloo (CPU) group, then the group is destroyed."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        tensor = torch.arange(4.0, device=device)
        dist.all_reduce(tensor)
        ok = bool(torch.equal(tensor.cpu(), torch.arange(4.0)))
    finally:
        dist.destroy_process_group()
    return {"backend": backend, "all_reduce_ok": ok, "failures": [] if ok else [f"{backend} all_reduce gave {tensor}"]}


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes, gloo: exercise every stage")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--ari-min", type=float, default=0.99)
    parser.add_argument("--crf-min", type=float, default=0.995)
    parser.add_argument("--stats-tol", type=float, default=1e-6)
    parser.add_argument("--pseudo-min", type=float, default=0.98)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        print("gpu-check: no CUDA device (torch.cuda.is_available() is False); "
              "use --dry for the CPU dry run", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.dry else torch.device("cuda", 0)
    sizes = DRY if args.dry else FULL
    torch.manual_seed(0)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "mode": "dry" if args.dry else "cuda",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        scratch = Path(scratch)
        if "agreement" in args.stages:
            say("(a) CPU vs device agreement")
            report["agreement"] = agreement_checks(device, sizes, args)
            report["elapsed_after_s"] = {"agreement": time.perf_counter() - started}
            failures += report["agreement"].pop("failures")
        if "throughput" in args.stages:
            say("(b, c) throughput per stage and peak memory")
            report["throughput"] = throughput(device, sizes)
            report.setdefault("elapsed_after_s", {})["throughput"] = time.perf_counter() - started
        if "syncs" in args.stages:
            say("(d) host syncs per training step")
            report["syncs"] = {mode: syncs_per_step(device, sizes, mode, scratch / f"syncs_{mode}")
                               for mode in ("stats", "gradient")}
            report.setdefault("elapsed_after_s", {})["syncs"] = time.perf_counter() - started
        if "train" in args.stages:
            say("(e) 1-process training run, checkpoint, resume")
            shards = scratch / "shards"
            write_striped_shards(shards, num_shards=2, per_shard=8, size=(sizes.train_crop, sizes.train_crop),
                                 num_classes=4)
            report["collective"] = one_rank_collective(device)
            report["train_ddp"] = training_run(device, sizes, shards, scratch / "run_ddp", [])
            say("(f) the same with the DeepSpeed engine")
            report["train_deepspeed"] = training_run(
                device, sizes, shards, scratch / "run_deepspeed", ["em.mode=gradient", "em.engine=deepspeed"]
            )
            report.setdefault("elapsed_after_s", {})["train"] = time.perf_counter() - started
            for key in ("collective", "train_ddp", "train_deepspeed"):
                failures += report[key].pop("failures")
    report["seconds"] = time.perf_counter() - started
    report["failures"] = failures
    for failure in failures:
        print(f"gpu-check FAILED: {failure}", file=sys.stderr)
    print(json.dumps(report, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
