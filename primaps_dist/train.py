"""Distributed PriMaPs-EM training.

    torchrun --nproc_per_node=8 -m primaps_dist.train --config configs/cityscapes_dino_vits8.yaml [key=value ...]
    python -m primaps_dist.train --config configs/demo.yaml          # one process

One global step counter runs through three stages, all on the same infinite, resampled shard stream:

    [0, pca_steps)                      PCA init: streamed, all-reduced C x C covariance -> K directions
    [pca_steps, + kmeans_steps)         K-means baseline: all-reduced per-class sums and counts
    [.., + em_steps)                    PriMaPs-EM: features -> proposals -> CRF -> pseudo labels -> M-step

Every rank computes features and pseudo labels for its own batch; the M-step reduces per-class statistics
(`stats`) or gradients (`gradient`, DDP/DeepSpeed) so the prototypes are identical on every rank. The stages
call the same public functions that the multi-rank tests check bit for bit: ``CovarianceAccumulator.update``,
``em.kmeans.kmeans_step``, ``em.stats.stats_step`` and ``em.gradient.GradientEngine.step``, on the raw
features (each normalises once, in float64).
Checkpoints (rank 0, atomic) hold a :class:`~primaps_dist.train_state.TrainState`, everything needed to continue
bit for bit: prototypes and EM state, head/optimizer state, the global data-stream position and the MLflow run
id. The student's photometric view needs no state of its own: each sample's view is seeded by ``train.seed``
and the sample's place in the global training sequence (the batch's ``sample_index``), so it is the same on any
number of ranks and after a resume.

The module stays whole (~450 lines): nearly all of it is :class:`Trainer`, one class whose methods are the
stages of a step, its checkpoint and resume; the helpers it used to carry live in runtime.py, train_state.py,
checkpoint.py and em/.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from primaps_dist import checkpoint as ckpt
from primaps_dist import distributed as dist
from primaps_dist.backbones import build_backbone
from primaps_dist.config import Config, flatten, load_config, save_config
from primaps_dist.crf import crf_from_config
from primaps_dist.data.loader import collect_state, make_train_loader, merge_states
from primaps_dist.data.sources import check_shard_sources
from primaps_dist.diagnostics import DiagnosticsWindow, HealthMonitor
from primaps_dist.em import gradient as em_gradient
from primaps_dist.em.pca import CovarianceAccumulator
from primaps_dist.em.kmeans import kmeans_step
from primaps_dist.em.stats import PrototypeState, stats_step
from primaps_dist.errors import UserError, run_cli
from primaps_dist.evaluate import class_names, evaluate_prototypes, write_reports
from primaps_dist.metrics import class_usage_entropy
from primaps_dist.pseudo_labels import make_pseudo_labels
from primaps_dist.runtime import StepTimer, StopFlag, inject_fault, setup_logging
from primaps_dist.tracking import Tracker
from primaps_dist.train_state import BackboneRecord, TrainState, load_train_state

log = logging.getLogger("primaps_dist.train")

EXIT_PREEMPTED = 3  # a stop signal arrived; a checkpoint was written; the job can be requeued and resumes


# ------------------------------------------------------------------------------------------ small helpers


def verify_identical(prototypes: torch.Tensor, step: int) -> None:
    """All-gather the exact bytes' checksum of the prototypes; raise if any rank differs (bitwise check)."""
    digest = hashlib.sha256(prototypes.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    digests = dist.all_gather_object(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"prototypes differ across ranks at step {step}: {digests}")


def host_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Read a step's metrics back to Python floats, on logging steps only.

    Stages return device tensors (0-dim) or zero-argument callables instead of floats, because reading a
    device value makes the host wait for the GPU; a callable may return a float or a dict of floats (merged).
    """
    values: dict[str, float] = {}
    for name, value in metrics.items():
        value = value() if callable(value) else value
        if isinstance(value, dict):
            values.update({key: float(item) for key, item in value.items()})
        else:
            values[name] = float(value)
    return values


# ------------------------------------------------------------------------------------------ the trainer


@dataclass
class Stages:
    pca_end: int
    kmeans_end: int
    total: int

    @classmethod
    def from_config(cls, cfg: Config) -> "Stages":
        pca_end = cfg.train.pca_steps
        kmeans_end = pca_end + cfg.train.kmeans_steps
        return cls(pca_end, kmeans_end, kmeans_end + cfg.train.em_steps)

    def name(self, step: int) -> str:
        if step < self.pca_end:
            return "pca"
        return "kmeans" if step < self.kmeans_end else "em"


class Trainer:
    """Holds the state of one rank; :meth:`run` is the whole training loop.

    The collaborators can be injected (tests, other front ends); each default is what the command line uses:

    * ``backbone``: a frozen module ``[B, 3, H, W]`` in 0..1 -> ``[B, C, H/stride, W/stride]`` with attributes
      ``stride`` and ``out_channels``; default ``build_backbone(cfg.backbone)``.
    * ``loader``: an iterable of training batches, dicts with ``image`` ``[B, 3, S, S]`` float in 0..1 and,
      from the shard loader, ``sample_index`` int64 ``[B]`` (each sample's place in the global sequence; seeds
      its photometric view), ``state`` (stream position, checkpointed) and ``skipped``; used as given, also
      after a resume. Without ``sample_index`` the batch is taken as rank ``r``'s contiguous block of the global
      batch of step ``t``: indices ``t * B * W + r * B + [0, B)``. Default: :func:`make_train_loader` over
      ``data.train_shards`` from the resumed position.
    * ``tracker``: an object with the :class:`~primaps_dist.tracking.Tracker` methods ``start``,
      ``log_metrics``, ``log_artifact`` and ``finish``; default an MLflow Tracker (active on the master only).
    """

    def __init__(
        self,
        cfg: Config,
        env: dist.DistEnv,
        *,
        backbone: torch.nn.Module | None = None,
        loader: Iterable[dict[str, Any]] | None = None,
        tracker: Any = None,
    ):
        self.cfg = cfg
        self.env = env
        self.device = env.device  # chosen by init_distributed (handles one visible GPU per task)
        self.out_dir = Path(cfg.train.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.stages = Stages.from_config(cfg)
        self.stop = StopFlag()
        self.K = cfg.data.num_classes

        self.backbone = backbone if backbone is not None else _build_backbone_node_first(cfg, env, self.device)
        self.loader = loader
        self.tracker = tracker
        self.C = self.backbone.out_channels
        if cfg.data.crop_size % self.backbone.stride:
            raise UserError(
                f"config key 'data.crop_size': {cfg.data.crop_size} is not a multiple of the backbone stride "
                f"{self.backbone.stride} ({cfg.backbone.name})"
            )
        self.crf_fn = crf_from_config(cfg.crf)  # None for crf.backend=none
        self.covariance = CovarianceAccumulator(self.C)
        self.state = PrototypeState(self.K, self.C)
        self.engine: em_gradient.GradientEngine | None = None
        self.step = 0
        self.loader_state: Any = None
        self.skipped_total = 0
        self.baseline_prototypes: torch.Tensor | None = None  # K-means result, kept to report the baseline
        self.final_classes: dict[str, Any] = {}  # the final evaluation's assignment and class names, for the model
        self.mlflow_run_id: str | None = None
        self.diagnostics = DiagnosticsWindow()  # label-free pseudo-label health, read once per logging step
        self.health = HealthMonitor(cfg.proposals.median_filter)

    # -- checkpoints -------------------------------------------------------------------------------------

    def choose_checkpoint(self) -> Path | None:
        """The checkpoint to resume from: rank 0 picks the newest, every rank gets rank 0's choice, and if any
        rank cannot read that folder (a node-local output dir) all stop with one line. Collective."""
        latest = ckpt.find_latest(self.ckpt_dir) if self.env.is_master else None
        chosen = dist.all_gather_object(str(latest) if latest is not None else None)[0]
        if chosen is None:
            return None
        visible = dist.all_gather_object((Path(chosen) / "checkpoint.pt").is_file())
        blind = [rank for rank, seen in enumerate(visible) if not seen]
        if blind:
            raise UserError(f"train.output_dir: rank(s) {', '.join(map(str, blind))} cannot see the checkpoint {chosen} "
                            "that rank 0 resumes from; train.output_dir must be a folder every node shares")
        return Path(chosen)

    def resume(self) -> None:
        if not self.cfg.checkpoint.resume:
            return
        latest = self.choose_checkpoint()
        if latest is None:
            return
        saved = load_train_state(latest)
        saved.check_compatible(self.cfg, channels=self.C)
        self.step = saved.step
        self.state.load_state_dict(saved.em_state)
        self.mlflow_run_id = saved.mlflow_run_id or None
        self.skipped_total = saved.skipped_total
        self.baseline_prototypes = saved.kmeans_prototypes
        self.loader_state = saved.data_position  # global: valid on any number of ranks
        if saved.gradient_state is not None and self.cfg.em.mode == "gradient":
            self._ensure_engine()
            self.engine.load_state_dict(saved.gradient_state, checkpoint_dir=Path(latest))
        log.info("resumed from %s at step %d", latest, self.step)

    def train_state(self) -> tuple[TrainState, Any]:
        """This run's :class:`TrainState` and the engine's writer of sharded state (None unless DeepSpeed ZeRO).
        Collective: gathers every rank's data-stream position."""
        gradient_state, sharded_writer = None, None
        if self.engine is not None:
            gradient_state, sharded_writer = self.engine.checkpoint_parts()
        state = TrainState(
            prototypes=self.state.prototypes.detach().cpu().clone(),
            step=self.step,
            stage=self.stages.name(max(self.step - 1, 0)),
            config=self.cfg.to_dict(),
            backbone=BackboneRecord(self.cfg.backbone.name, list(self.cfg.backbone.layers), self.C),
            num_classes=self.K,
            world_size=self.env.world_size,
            em_state=self.state.state_dict(),
            data_position=merge_states(dist.all_gather_object(self.loader_state)),
            skipped_total=self.skipped_total,
            mlflow_run_id=self.mlflow_run_id or "",
            kmeans_prototypes=self.baseline_prototypes,
            gradient_state=gradient_state,
        )
        return state, sharded_writer

    def save(self) -> Path:
        """Every rank calls this (collects loader states); rank 0 writes the payload atomically."""
        state, sharded_writer = self.train_state()
        # Collective: every rank reaches every collective, and a failure anywhere raises everywhere.
        with dist.guard_collective("checkpoint save"):  # a peer lost mid-save: one line, not a traceback
            path = ckpt.save_checkpoint(
                self.ckpt_dir, self.step, state.to_payload() if self.env.is_master else None,
                keep=self.cfg.checkpoint.keep, all_ranks_writer=sharded_writer,
            )
        if self.env.is_master:
            log.info("saved checkpoint %s", path)
        return path

    # -- control: skipped samples and stop requests, without a collective of their own --------------------

    def _fold_control(self, reduced: torch.Tensor | None, local: torch.Tensor, window: dict[str, float]) -> bool:
        """Fold one step's control values in; True when a rank asked to stop. ``reduced``: the sums the step's
        all-reduce carried, or None when the step had none (PCA): ``local`` then waits for the logging step."""
        if reduced is None:
            window["skipped"] += float(local[0])
            window["unreduced"] += 1
            return False
        values = reduced.cpu()
        self.skipped_total += int(values[0])
        return bool(values[1] > 0)

    def _reduce_window(self, window: dict[str, float]) -> bool:
        """One explicit collective for the control values no step carried (PCA stage only)."""
        control = torch.tensor([window["skipped"], float(self.stop.requested)], dtype=torch.float64)
        dist.all_reduce_sum(control)
        self.skipped_total += int(control[0])
        window["skipped"], window["unreduced"] = 0.0, 0
        return bool(control[1] > 0)

    # -- stages ------------------------------------------------------------------------------------------

    def _ensure_engine(self) -> None:
        if self.engine is None:
            self.engine = em_gradient.make_engine(self.state.prototypes, self.cfg.em, self.env, self.device)

    def pca_step(self, features: torch.Tensor) -> dict[str, float]:
        self.covariance.update(features)
        if self.step == self.stages.pca_end - 1:
            self.covariance.reduce()
            directions = self.covariance.principal_directions(self.K, seed=self.cfg.train.seed)
            self.state.initialize(directions.to(self.state.prototypes.device))
            log.info("PCA initialisation from %d feature vectors", int(self.covariance.count))
        return {}

    def kmeans_step(self, features: torch.Tensor) -> dict[str, Any]:
        summary = kmeans_step(self.state, features, self.cfg.em.momentum)
        if self.step == self.stages.kmeans_end - 1:
            self.baseline_prototypes = self.state.prototypes.detach().cpu().clone()
        return {"kmeans/objective": summary.objective,
                "class_usage_entropy": partial(class_usage_entropy, summary.counts)}

    def sample_indices(self, batch: dict[str, Any]) -> torch.Tensor:
        """int64 ``[B]``: each sample's place in the global training sequence (seeds its photometric view): the
        shard loader's ``sample_index``, else (an injected loader) this rank's contiguous block of the global
        batch of the current step, ``step * B * W + rank * B + [0, B)``."""
        if "sample_index" in batch:
            return torch.as_tensor(batch["sample_index"], dtype=torch.int64)
        size = int(batch["image"].shape[0])
        first = (self.step * self.env.world_size + self.env.rank) * size
        return torch.arange(first, first + size, dtype=torch.int64)

    def e_and_m_step(self, images: torch.Tensor, features: torch.Tensor, timer: StepTimer,
                     sample_index: torch.Tensor | None = None) -> dict[str, Any]:
        """One PriMaPs-EM step: the E-step (pseudo labels of ``images`` ``[B, 3, H, W]`` from ``features``
        ``[B, C, h, w]`` and the teacher prototypes), then the M-step (``stats`` or ``gradient``).
        ``sample_index`` int64 ``[B]`` (:meth:`sample_indices`) seeds the photometric student view
        (``gradient`` mode with ``em.photometric``; required there)."""
        cfg = self.cfg
        label_size = cfg.proposals.label_size or cfg.data.crop_size
        teacher = self.state.prototypes if cfg.em.mode == "stats" else self.engine.teacher_prototypes()
        pseudo = make_pseudo_labels(
            features,
            images,
            teacher.to(features.device),
            threshold=cfg.proposals.threshold,
            coverage=cfg.proposals.coverage,
            max_masks=cfg.proposals.max_masks,
            median_filter=cfg.proposals.median_filter,
            crf_fn=self.crf_fn,
            label_size=(label_size, label_size),
        )
        timer.lap("proposals", self.device)
        self.diagnostics.add(pseudo.stats)  # device tensors: no host sync until the logging step
        metrics: dict[str, Any] = {}  # device values, read by host_metrics on logging steps
        if cfg.em.mode == "stats":
            # Statistics live at the feature grid: pseudo labels are sampled at patch centres. "nearest-exact"
            # reads the pixel at (i + 0.5) * scale; plain "nearest" reads i * scale, the top-left corner of
            # the patch, which shifts every label half a patch up and left of its feature.
            grid_labels = F.interpolate(
                pseudo.labels[:, None].float(), size=features.shape[-2:], mode="nearest-exact"
            )[:, 0].long()
            # Pseudo labels are classes or the ignore id by construction: no range check (a host sync).
            summary = stats_step(self.state, features, grid_labels, cfg.em.momentum, check_labels=False)
            metrics.update({"em/objective": summary.objective,
                            "class_usage_entropy": partial(class_usage_entropy, summary.counts)})
        else:
            student_images = images
            if cfg.em.photometric:
                if sample_index is None:
                    raise ValueError("em.photometric needs the batch's sample_index to seed the student view")
                draws = em_gradient.photometric_draws(sample_index, cfg.train.seed)  # [8, B], per sample
                student_images = em_gradient.photometric_view(images, draws)
            student_features = features if student_images is images else self.backbone(student_images)
            loss, counts = self.engine.step_on_device(student_features, pseudo.labels)
            self.state.set_prototypes(self.engine.teacher_prototypes())
            metrics.update({"em/loss": loss, "class_usage_entropy": partial(class_usage_entropy, counts)})
            engine = self.engine
            metrics["em/engine"] = lambda: engine.last_metrics  # focal-weight spread and head gains
        return metrics

    def final_evaluation(self, tracker: Tracker) -> None:
        """Evaluate the final prototypes on the validation split (never used to select checkpoints)."""
        result = evaluate_prototypes(
            self.cfg, self.env, self.backbone, self.state.prototypes, self.device,
            num_overlays=self.cfg.tracking.num_overlays,
        )
        baseline = None
        if self.baseline_prototypes is not None and self.cfg.train.em_steps > 0:
            baseline = evaluate_prototypes(self.cfg, self.env, self.backbone, self.baseline_prototypes, self.device)
        if not self.env.is_master:
            return
        paths = write_reports(result, self.out_dir / "eval", self.cfg)
        scores = {"eval/accuracy": result.scores["accuracy"], "eval/miou": result.scores["miou"]}
        if baseline is not None:
            paths.append(write_reports(baseline, self.out_dir / "eval_kmeans_baseline", self.cfg)[0])
            scores.update({"eval/baseline_accuracy": baseline.scores["accuracy"],
                           "eval/baseline_miou": baseline.scores["miou"]})
            log.info("K-means baseline: accuracy %.2f %%, mIoU %.2f %%",
                     baseline.scores["accuracy"], baseline.scores["miou"])
        tracker.log_metrics(scores, self.step)
        self.final_classes = {"assignment": list(result.scores["assignment"]), "class_names": class_names(self.cfg)}
        for path in paths:
            tracker.log_artifact(path, path.parent.name)
        latest = ckpt.find_latest(self.ckpt_dir)
        if latest is not None:
            tracker.log_artifact(latest / "checkpoint.pt", "checkpoint")
        log.info("final evaluation: accuracy %.2f %%, mIoU %.2f %%", result.scores["accuracy"], result.scores["miou"])

    # -- the loop ----------------------------------------------------------------------------------------

    def run(self) -> int:
        cfg, env = self.cfg, self.env
        if self.env.is_master:
            ckpt.ensure_writable_dir(self.out_dir, "train.output_dir")
            save_config(cfg, self.out_dir / "config.yaml")
        dist.barrier()
        self.resume()
        if cfg.em.mode == "gradient" and self.step >= self.stages.kmeans_end:
            self._ensure_engine()

        tracker = self.tracker
        if tracker is None:
            tracker = Tracker(cfg.tracking, is_master=self.env.is_master, output_dir=self.out_dir,
                              run_id=self.mlflow_run_id)
        self.mlflow_run_id = tracker.start(flatten(cfg.to_dict()), run_name=cfg.tracking.run_name or None)
        if self.env.is_master and self.step == 0:
            tracker.log_artifact(self.out_dir / "config.yaml")

        # A resumed job re-enters the PCA stage from its start: the covariance is not checkpointed, and
        # the deterministic stream replays the same batches, so the result is the same.
        if self.step < self.stages.pca_end:
            self.step = 0
            self.loader_state = None
        loader = self.loader
        if loader is None:
            loader = make_train_loader(
                cfg.data,
                rank=env.rank,
                world_size=env.world_size,
                seed=cfg.train.seed,
                start_step=self.step,
                resume_state=self.loader_state,
                as_uint8=True,  # converted on the device; pinned for non-blocking copies
                pin_memory=self.device.type == "cuda",
            )
        batches = iter(loader)
        progress = _progress_bar(self.env.is_master, self.stages.total, self.step)
        timer = StepTimer()
        window_steps, window_images, window_start = 0, 0, time.perf_counter()
        window = {"skipped": 0.0, "unreduced": 0}  # control values of steps whose collective did not carry them
        status, exit_code = "FINISHED", 0
        try:
            while self.step < self.stages.total:
                stage = self.stages.name(self.step)
                if stage == "em" and cfg.em.mode == "gradient":
                    self._ensure_engine()
                timer.lap("other", self.device)
                batch = next(batches)
                if "state" in batch:  # an injected loader may have no stream position to checkpoint
                    self.loader_state = collect_state(batch, self.loader_state)
                # The skipped count and the stop flag ride in the step's own all-reduce (no collective of their own).
                control = torch.tensor([float(batch.get("skipped", 0)), float(self.stop.requested)], dtype=torch.float64)
                dist.ride_along(control)
                images = batch["image"].to(self.device, non_blocking=True)
                if images.dtype == torch.uint8:
                    images = images.float().div_(255.0)
                timer.lap("data", self.device)
                features = self.backbone(images)
                timer.lap("backbone", self.device)
                if stage == "pca":
                    metrics = self.pca_step(features)
                elif stage == "kmeans":
                    metrics = self.kmeans_step(features)
                else:
                    metrics = self.e_and_m_step(images, features, timer, self.sample_indices(batch))
                timer.lap("update", self.device)
                self.step += 1
                if cfg.train.verify_every and self.step > self.stages.pca_end and self.step % cfg.train.verify_every == 0:
                    verify_identical(self.state.prototypes, self.step)
                inject_fault(self.step, env.rank)
                window_steps += 1
                window_images += images.shape[0]
                progress.update(1)

                at_log = self.step % cfg.train.log_every == 0 or self.step == self.stages.total
                stop_now = self._fold_control(dist.take_rider(), control, window)
                if at_log and window["unreduced"]:  # steps without an all-reduce of their own (PCA stage)
                    stop_now = self._reduce_window(window) or stop_now
                if at_log:
                    elapsed = time.perf_counter() - window_start
                    rate = window_images * env.world_size / max(elapsed, 1e-9)
                    times = timer.pop()
                    diagnostics = self.diagnostics.pop()
                    if self.env.is_master:
                        self.health.check(diagnostics, self.step)
                    metrics = {
                        **host_metrics(metrics),
                        **diagnostics,
                        "images_per_s": rate,
                        "skipped_samples": float(self.skipped_total),
                        **{f"time/{name}": seconds / window_steps for name, seconds in times.items()},
                    }
                    tracker.log_metrics({"stage": float(["pca", "kmeans", "em"].index(stage)), **metrics}, self.step)
                    progress.set_postfix(stage=stage, img_s=f"{rate:.1f}")
                    if self.env.is_master:
                        split = " ".join(f"{name}={1000 * seconds / window_steps:.0f}ms" for name, seconds in times.items())
                        log.info("step %d/%d %s %.1f img/s | %s", self.step, self.stages.total, stage, rate, split)
                    window_steps, window_images, window_start = 0, 0, time.perf_counter()
                if stop_now:  # seen at the step after the signal (at the logging step during the PCA stage)
                    # Before the PCA finishes there is nothing to keep: a resumed job redoes the PCA.
                    if self.step >= self.stages.pca_end:
                        self.save()
                        log.warning("stopped at step %d on request; checkpoint written", self.step)
                    else:
                        log.warning("stopped at step %d on request, during the PCA stage (redone on resume)", self.step)
                    status, exit_code = "KILLED", EXIT_PREEMPTED
                    break
                if self.step >= self.stages.pca_end and (
                    self.step % cfg.checkpoint.every_steps == 0 or self.step == self.stages.total
                ):
                    self.save()
            if exit_code == 0 and self.cfg.data.val_shards:
                self.final_evaluation(tracker)
            if exit_code == 0 and self.env.is_master:  # the segmenter as an MLflow model; never fails the run
                from primaps_dist.segmenter.publish import log_segmenter_model

                log_segmenter_model(tracker, cfg, self.backbone, self.state.prototypes, self.out_dir, step=self.step,
                                    **self.final_classes)
        except BaseException:
            status = "FAILED"
            raise
        finally:
            progress.close()
            tracker.finish(status)
        return exit_code


def _build_backbone_node_first(cfg: Config, env: dist.DistEnv, device: torch.device) -> torch.nn.Module:
    """Local rank 0 of each node builds the backbone first (fetching its weights into the node's hub cache), the
    other ranks wait at a barrier (bounded by ``dist.timeout_s``) and then load from that cache. Weights that need
    no download (the packaged EfficientNet-Lite0, ``random``, a local file) are loaded by all ranks at once."""
    fetches = cfg.backbone.weights == "pretrained" and cfg.backbone.name != "efficientnet_lite0"
    if not fetches or not env.is_distributed:
        return build_backbone(cfg.backbone, device)
    backbone = build_backbone(cfg.backbone, device) if env.local_rank == 0 else None
    dist.barrier()
    return backbone if backbone is not None else build_backbone(cfg.backbone, device)


def _progress_bar(enabled: bool, total: int, start: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


# ------------------------------------------------------------------------------------------ entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="primaps_dist.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config file (configs/*.yaml)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    # Every shard path or URL (train and val) before the process group, the backbone or an MLflow run:
    # a typo is one line now, not after a model download, a database migration or a whole training run.
    check_shard_sources(cfg.data)
    env = dist.init_distributed(cfg.dist, cfg.train.device)
    setup_logging(env.rank)
    torch.manual_seed(cfg.train.seed)
    try:
        return Trainer(cfg, env).run()
    finally:
        dist.shutdown()


if __name__ == "__main__":
    sys.exit(run_cli(main))
