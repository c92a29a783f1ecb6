"""The trainer's control values: a stop signal is seen at the step after it arrives (not at the next logging
step), carried by the step's own all-reduce; batches may arrive as uint8 and are converted on the device."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from primaps_dist import distributed
from primaps_dist.distributed import DistEnv
from primaps_dist.errors import UserError
from primaps_dist.train import EXIT_PREEMPTED, Trainer
from primaps_dist.train_state import load_train_state
from test_trainer_inprocess import RecordingTracker, TinyBackbone, quadrant_images, tiny_config


pytestmark = pytest.mark.usefixtures("keep_signal_handlers")


def test_stop_signal_is_seen_at_the_next_step_without_a_collective_of_its_own(tmp_path):
    cfg = tiny_config(tmp_path / "run", "stats")
    cfg.train.kmeans_steps, cfg.train.log_every = 8, 100  # no logging step before the end

    def batches():
        for index in range(20):
            if index == 3:  # during step 4 (a K-means step)
                os.kill(os.getpid(), signal.SIGUSR1)
            yield {"image": quadrant_images(index), "skipped": 1}

    trainer = Trainer(cfg, DistEnv(), backbone=TinyBackbone(), loader=batches(), tracker=RecordingTracker())
    distributed.reset_collective_counts()
    assert trainer.run() == EXIT_PREEMPTED
    assert trainer.step == 4 and load_train_state(tmp_path / "run").step == 4
    # The PCA step's covariance reduce and the 3 K-means steps' reduces, nothing more: the control values
    # (skipped count, stop flag) rode along in them.
    counts = distributed.collective_counts()
    assert counts["all_reduce_sum"] == 1 + 3, counts
    assert trainer.skipped_total == 4  # every step's skipped count arrived, also without a logging step


def test_uint8_batches_train_like_float_batches(tmp_path):
    images = [quadrant_images(seed) for seed in range(3)]
    results = []
    for name, convert in (("float", lambda x: x), ("uint8", lambda x: (x * 255).round().to(torch.uint8))):
        batches = [{"image": convert(image)} for image in images]
        if name == "float":
            batches = [{"image": (image * 255).round() / 255} for image in images]
        trainer = Trainer(tiny_config(tmp_path / name, "stats"), DistEnv(), backbone=TinyBackbone(),
                          loader=iter(batches), tracker=RecordingTracker())
        assert trainer.run() == 0
        results.append(trainer.state.prototypes)
    assert torch.equal(results[0], results[1])


def test_a_rank_that_cannot_see_rank_0s_checkpoint_stops_naming_output_dir(tmp_path, monkeypatch):
    """Rank 0 picks the checkpoint and every rank gets its choice; when another rank cannot read that folder (a
    node-local output dir), the run stops with one line naming train.output_dir."""
    cfg = tiny_config(tmp_path / "run", "stats")
    first = Trainer(cfg, DistEnv(), backbone=TinyBackbone(), loader=iter([{"image": quadrant_images(i)} for i in range(3)]),
                    tracker=RecordingTracker())
    assert first.run() == 0
    trainer = Trainer(cfg, DistEnv(), backbone=TinyBackbone(), loader=iter([]), tracker=RecordingTracker())
    assert trainer.choose_checkpoint().name == "step_000000003"
    gathered = iter([None, [False, True, False]])  # rank 0's choice is kept; ranks 0 and 2 do not see it

    def two_views(obj):
        answer = next(gathered)
        return [obj, obj, obj] if answer is None else answer

    monkeypatch.setattr(distributed, "all_gather_object", two_views)
    with pytest.raises(UserError) as err:
        trainer.choose_checkpoint()
    message = str(err.value)
    assert "\n" not in message and "train.output_dir" in message and "rank(s) 0, 2" in message
