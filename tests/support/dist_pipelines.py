"""Small PCA / K-means / stats-EM / gradient pipelines shared by the multi-process tests and their worker
script (support/dist_workers.py).

The pipelines run unchanged in one process (collectives are no-ops) and under torchrun with 2 gloo ranks,
where rank r takes its slice of every global batch. Comparing the two checks that W ranks with batch B
compute what 1 rank computes with batch W*B.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from support.env import REPO, child_env
from support.run import Result, run_command, torchrun_command

WORKERS = Path(__file__).resolve().parent / "dist_workers.py"

# The ``timeout`` scenario (rank 1 hangs, rank 0 must fail with one line): its dist.timeout_s and rank 1's sleep.
# The timeout also bounds the healthy part, joining the group: both ranks start at once under torchrun, but on
# a loaded machine one may finish importing seconds after the other, and a join slower than the timeout fails
# the test with the wrong error. The test waits the full timeout, so it stays short: 6 s (was 3 s) costs 3 s
# more. The sleep outlasts it with room to spare, so rank 0 always times out before rank 1 arrives.
HUNG_PEER_TIMEOUT_S = 6.0
HUNG_PEER_SLEEP_S = 2 * HUNG_PEER_TIMEOUT_S

# Small problem: K prototypes of dimension C on h x w feature maps; B images per rank per step.
K, C, H, W = 5, 16, 6, 6
PCA_STEPS, KMEANS_STEPS, EM_STEPS = 3, 4, 4
KMEANS_MOMENTUM, EM_MOMENTUM = 0.5, 0.9


def global_batches(seed: int, steps: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` global batches: clustered features ``[batch, C, H, W]`` and labels ``[batch, H, W]``.

    Labels are noisy cluster ids with ~20 % ignore (255); class K-1 never occurs, so its prototype must
    stay put in the EM steps.
    """
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(K, C, generator=generator) * 2.0 + 0.5
    batches = []
    for _ in range(steps):
        ids = torch.randint(0, K, (batch, H, W), generator=generator)
        noise = torch.randn(batch, H, W, C, generator=generator)
        features = (centres[ids] + noise).permute(0, 3, 1, 2).contiguous()
        labels = torch.where(torch.rand(batch, H, W, generator=generator) < 0.2, 255, ids % (K - 1))
        batches.append((features, labels))
    return batches


def local_slice(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per_rank = tensor.shape[0] // world
    return tensor[rank * per_rank : (rank + 1) * per_rank]


def run_stats_pipeline(seed: int, rank: int, world: int, per_rank_batch: int = 3, check_ranks=None) -> dict:
    """PCA init -> K-means steps -> stats EM steps on this rank's slices; records everything per step.

    ``check_ranks(tensor) -> bool``: optional callback (multi-process) that tells whether every rank holds
    bitwise the same tensor; it is called outside the counted window.
    """
    from primaps_dist import distributed
    from primaps_dist.em import CovarianceAccumulator, PrototypeState, kmeans_step, stats_step

    batch = per_rank_batch * world
    record: dict = {"kmeans": [], "em": [], "em_objective": [], "em_counts": [], "collectives": [], "consistent": []}
    accumulator = CovarianceAccumulator(C)
    for features, _ in global_batches(seed, PCA_STEPS, batch):
        accumulator.update(local_slice(features, rank, world))
    distributed.reset_collective_counts()
    accumulator.reduce()
    directions = accumulator.principal_directions(K)
    record["pca_collectives"] = distributed.collective_counts()
    record["pca"] = directions.clone()
    record["pca_mean"] = accumulator.mean().clone()
    if check_ranks is not None:
        record["consistent"].append(check_ranks(directions))

    state = PrototypeState.from_prototypes(directions)
    for features, _ in global_batches(seed + 1, KMEANS_STEPS, batch):
        distributed.reset_collective_counts()
        kmeans_step(state, local_slice(features, rank, world), KMEANS_MOMENTUM)
        record["collectives"].append(distributed.collective_counts())
        record["kmeans"].append(state.prototypes.clone())
        if check_ranks is not None:
            record["consistent"].append(check_ranks(state.prototypes))
    for features, labels in global_batches(seed + 2, EM_STEPS, batch):
        distributed.reset_collective_counts()
        result = stats_step(state, local_slice(features, rank, world), local_slice(labels, rank, world), EM_MOMENTUM)
        record["collectives"].append(distributed.collective_counts())
        record["em"].append(state.prototypes.clone())
        record["em_objective"].append(float(result.objective))
        record["em_counts"].append(result.counts.clone())
        if check_ranks is not None:
            record["consistent"].append(check_ranks(state.prototypes))
    record["state"] = state.state_dict()
    return record


def gradient_cfg(engine: str = "ddp", **overrides) -> SimpleNamespace:
    """An EMConfig-like namespace for gradient mode (``ema_every=2`` so few steps show EMA updates)."""
    values = dict(
        mode="gradient",
        engine=engine,
        deepspeed_config=str(REPO / "configs" / "deepspeed" / "zero0.json"),
        lr=5e-3,
        focal_gamma=2.0,
        ema_every=2,
        ema_max=0.98,
        photometric=True,
        momentum=0.98,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


GRADIENT_STEPS = 4


def run_gradient_pipeline(engine: str, seed: int, rank: int, world: int, per_rank_batch: int = 2, **cfg) -> dict:
    """A few `gradient` steps; labels at twice the feature resolution (exercises the logit upsampling)."""
    from primaps_dist import distributed
    from primaps_dist.em.gradient import make_engine

    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(K, C, generator=generator)
    engine = make_engine(prototypes, gradient_cfg(engine, **cfg), distributed.current_env())
    record: dict = {"loss": [], "counts": [], "running": [], "momentum": [], "decay": []}
    batch = per_rank_batch * world
    for features, labels in global_batches(seed + 5, GRADIENT_STEPS, batch):
        labels = labels.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
        loss, counts = engine.step(local_slice(features, rank, world), local_slice(labels, rank, world))
        record["loss"].append(loss)
        record["counts"].append(counts.clone())
        record["running"].append(engine.head.weight.detach().clone())
        record["momentum"].append(engine.momentum.weight.clone())
        record["decay"].append(engine.last_ema_decay)
    record["state"] = engine.state_dict()
    return record


def launch(scenario: str, outdir: Path, nproc: int = 2, timeout: float = 240.0) -> Result:
    """Run ``support/dist_workers.py SCENARIO OUTDIR`` under torchrun (standalone, gloo on CPU)."""
    return run_command(torchrun_command(nproc, WORKERS, scenario, outdir), env=child_env(), cwd=REPO, timeout=timeout)


_LAUNCHES: dict[str, tuple[Result, Path]] = {}


def launched(scenario: str) -> tuple[Result, Path]:
    """Run a scenario once per test session (several test modules read the same launch)."""
    if scenario not in _LAUNCHES:
        outdir = Path(tempfile.mkdtemp(prefix=f"primaps_{scenario}_"))
        _LAUNCHES[scenario] = (launch(scenario, outdir), outdir)
    return _LAUNCHES[scenario]


def load_ranks(scenario: str, name: str, world: int = 2) -> list[dict]:
    """Per-rank records of ``name`` (stats, ddp, ...) from a session launch; fails with the launch's output."""
    proc, outdir = launched(scenario)
    assert proc.returncode == 0, f"torchrun {scenario} failed:\n{proc.describe()}"
    return [torch.load(outdir / f"{name}_rank{rank}.pt", weights_only=True) for rank in range(world)]
