"""Elastic determinism end to end: the same prototypes on any number of ranks and loader workers, also across
a resume on another number of ranks (real torchrun, gloo, CPU; the demo data set, a global batch of 8).

One uninterrupted W = 1 run is the reference (checkpoints after every step). Against it:
(a) W = 2 with 2 loader workers (K-means prototypes at step 3) and W = 4 without workers (stats-EM prototypes at
    step 4) agree within 1e-9;
(b) the W = 2 run, stopped at step 3 and resumed on W = 1 for the EM step, ends with the reference's prototypes
    within 1e-9;
(c) ``gradient`` mode with the photometric student view: W = 2 (2 workers) vs W = 1 after 1 and 3 EM steps, and
    a W = 2 run stopped after 1 EM step and resumed on W = 1, within 1e-6. Each sample's view is seeded by its
    place in the data, so only DDP's float32 gradient averaging differs (~1e-8); views drawn per rank, as
    before, gave 0.010 / 0.019.
Per-rank batches stay >= 2: on the CPU, oneDNN picks another convolution for a batch of 1, whose features differ
by ~3e-5 (the guarantee needs the backbone's per-image output not to depend on the batch size).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from support.demo import tiny_train_args
from support.env import child_env
from support.run import module_command, run_command, torchrun_command

pytestmark = pytest.mark.slow

TOLERANCE = 1e-9
GRADIENT_TOLERANCE = 1e-6  # float32 gradients averaged over W ranks by DDP: measured 3e-8 / 1.5e-8 without views
# theta_M copies the trained head at the first EM step (the default interval 10 would keep the K-means
# prototypes for 3 steps and the comparison would be void).
GRADIENT = ("em.mode=gradient", "em.engine=ddp", "em.photometric=true", "em.ema_every=1")


def _run(tmp_path: Path, demo_data, name: str, nproc: int, workers: int, em: int, out: Path | None = None,
         extra: tuple[str, ...] = ()) -> Path:
    out = out or tmp_path / name
    args = tiny_train_args(demo_data.train_shards, out, "data.global_batch_size=8", f"data.num_workers={workers}",
                           "data.shuffle_buffer=16", "train.seed=3", "checkpoint.keep=5", *extra,
                           pca=1, kmeans=2, em=em)
    command = torchrun_command(nproc, "primaps_dist.train", *args) if nproc > 1 else \
        module_command("primaps_dist.train", *args)
    result = run_command(command, env=child_env(tmp_path), timeout=400, cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    return out


def _prototypes(out: Path, step: int) -> torch.Tensor:
    payload = torch.load(out / "checkpoints" / f"step_{step:09d}" / "checkpoint.pt", weights_only=True)
    assert payload["step"] == step
    return payload["prototypes"].double()


def test_prototypes_agree_across_ranks_workers_and_resume(tmp_path: Path, demo_data) -> None:
    reference = _run(tmp_path, demo_data, "w1", nproc=1, workers=0, em=1)
    two = _run(tmp_path, demo_data, "w2", nproc=2, workers=2, em=0)  # stops after K-means (step 3)
    four = _run(tmp_path, demo_data, "w4", nproc=4, workers=0, em=1)
    kmeans_gap = (_prototypes(two, 3) - _prototypes(reference, 3)).abs().max().item()
    em_gap = (_prototypes(four, 4) - _prototypes(reference, 4)).abs().max().item()
    assert kmeans_gap <= TOLERANCE and em_gap <= TOLERANCE, (kmeans_gap, em_gap)
    # A job that moved from 2 ranks to 1: the global data position and EM state carry over.
    _run(tmp_path, demo_data, "w2", nproc=1, workers=0, em=1, out=two)
    resume_gap = (_prototypes(two, 4) - _prototypes(reference, 4)).abs().max().item()
    assert resume_gap <= TOLERANCE, resume_gap
    moved = (_prototypes(reference, 4) - _prototypes(reference, 3)).abs().max().item()
    assert moved > 1e-4  # the EM step changed the prototypes: the comparison can fail


def test_gradient_mode_with_photometric_views_agrees_across_ranks_and_resume(tmp_path: Path, demo_data) -> None:
    reference = _run(tmp_path, demo_data, "g1", nproc=1, workers=0, em=3, extra=GRADIENT)
    two = _run(tmp_path, demo_data, "g2", nproc=2, workers=2, em=3, extra=GRADIENT)
    gaps = [(_prototypes(two, step) - _prototypes(reference, step)).abs().max().item() for step in (4, 6)]
    moved = (_prototypes(reference, 4) - _prototypes(reference, 3)).abs().max().item()
    print(f"gradient + photometric, W = 2 vs W = 1: max difference {gaps[0]:.2e} after 1 EM step, "
          f"{gaps[1]:.2e} after 3; the first EM step moved the prototypes by {moved:.3f}")
    assert max(gaps) <= GRADIENT_TOLERANCE, gaps
    assert moved > 1e-3  # theta_M follows the student from the first EM step: the comparison can fail
    # A job that moved from 2 ranks to 1 after one EM step: the views of the remaining steps are the same.
    moving = _run(tmp_path, demo_data, "g21", nproc=2, workers=2, em=1, extra=GRADIENT)
    _run(tmp_path, demo_data, "g21", nproc=1, workers=0, em=3, out=moving, extra=GRADIENT)
    resume_gap = (_prototypes(moving, 6) - _prototypes(reference, 6)).abs().max().item()
    print(f"W = 2 resumed on W = 1 after 1 EM step: max difference {resume_gap:.2e} after 3 EM steps")
    assert resume_gap <= GRADIENT_TOLERANCE, resume_gap
