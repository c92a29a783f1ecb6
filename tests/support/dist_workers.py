"""Scenarios run by the multi-process tests: ``torchrun ... tests/support/dist_workers.py SCENARIO OUTDIR``.

Each rank writes ``OUTDIR/{stats,ddp,deepspeed,timeout}_rank{R}.pt`` (torch.save of plain tensors and
lists) for the test to compare.
Scenarios: ``stats`` (PCA, K-means, stats EM), ``ddp`` and ``deepspeed`` (gradient mode), ``core``
(stats + ddp in one launch, to pay the start-up cost once), ``srun`` (launched by srun, not torchrun), ``timeout``
(rank 1 hangs; rank 0 must fail with a one-line CollectiveTimeout message, exit status 2), ``shutdown``
(gloo thread names before and after ``distributed.shutdown``, written to ``threads_rank{R}.pt``).
"""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: run as a script, import `support`

from support import dist_pipelines as utils  # noqa: E402

from primaps_dist import distributed  # noqa: E402
from primaps_dist.config import DistConfig  # noqa: E402
from primaps_dist.errors import run_cli  # noqa: E402

SEED = 7


def bitwise_equal_on_all_ranks(tensor: torch.Tensor) -> bool:
    gathered = distributed.all_gather_object(tensor.detach().cpu())
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def run_stats(rank: int, world: int, outdir: Path) -> None:
    record = utils.run_stats_pipeline(SEED, rank, world, check_ranks=bitwise_equal_on_all_ranks)
    torch.save(record, outdir / f"stats_rank{rank}.pt")


def run_gradient(engine: str, env, outdir: Path) -> None:
    record = utils.run_gradient_pipeline(engine, SEED, env.rank, env.world_size)
    record["consistent"] = [bitwise_equal_on_all_ranks(w) for w in record["running"]]
    if engine == "deepspeed":
        record.update(deepspeed_resume(env, outdir))
    torch.save(record, outdir / f"{engine}_rank{env.rank}.pt")


def deepspeed_resume(env, outdir: Path) -> dict:
    """ZeRO-1: train, checkpoint (rank 0 names the folder, rank 1 passes None, as the trainer does), restore
    into a fresh engine from the state dict + folder, then one more identical step on both."""
    from primaps_dist.em.gradient import make_engine

    cfg = utils.gradient_cfg("deepspeed", deepspeed_config=str(utils.REPO / "configs" / "deepspeed" / "zero1.json"))
    (features, labels), (next_features, next_labels) = utils.global_batches(SEED, 2, 2 * env.world_size)
    labels = labels.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    next_labels = next_labels.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    local = lambda t: utils.local_slice(t, env.rank, env.world_size)  # noqa: E731

    original = make_engine(torch.randn(utils.K, utils.C, generator=torch.Generator().manual_seed(1)), cfg, env)
    for _ in range(3):
        original.step(local(features), local(labels))
    state, writer = original.checkpoint_parts()
    folder = outdir / "zero1"
    if env.is_master:
        folder.mkdir()
    writer(folder if env.is_master else None)

    resumed = make_engine(torch.zeros(utils.K, utils.C), cfg, env)
    resumed.load_state_dict(state, checkpoint_dir=folder)
    original.step(local(next_features), local(next_labels))
    resumed.step(local(next_features), local(next_labels))
    return {
        "zero1_files": sorted(p.name for p in (folder / "deepspeed" / "head").iterdir()),
        "zero1_original": original.head.weight.detach().clone(),
        "zero1_resumed": resumed.head.weight.detach().clone(),
        "zero1_optimizer_in_state_dict": state["engine"]["optimizer"] is not None,
        "zero1_writer_all_ranks": bool(getattr(writer, "all_ranks", False)),
        "zero1_consistent": bitwise_equal_on_all_ranks(original.head.weight.detach()),
    }


def thread_names() -> list[str]:
    """Names of this process's threads (Linux), e.g. gloo's ``pt_gloo_runloop`` and ``gloo_tcp_loop``."""
    tasks = Path("/proc/self/task")
    return sorted((task / "comm").read_text().strip() for task in tasks.iterdir()) if tasks.is_dir() else []


def run_shutdown(rank: int, outdir: Path) -> None:
    """Gloo threads alive after shutdown can abort the process at interpreter exit (see distributed.shutdown)."""
    distributed.all_reduce_sum(torch.ones(3))
    gc.disable()  # no automatic collection may free the cycle below before shutdown; gc.collect() still works
    cycle: dict = {"group": torch.distributed.group.WORLD}
    cycle["self"] = cycle  # keeps the process group alive until a GC, as evaluate's objects did
    del cycle
    before = thread_names()
    distributed.shutdown()
    gc.enable()
    torch.save({"before_shutdown": before, "after_shutdown": thread_names()}, outdir / f"threads_rank{rank}.pt")


def run_timeout(rank: int, outdir: Path) -> None:
    if rank == 1:
        time.sleep(utils.HUNG_PEER_SLEEP_S)  # twice the group timeout: rank 0 gives up first
    started = time.monotonic()
    try:
        distributed.all_reduce_sum(torch.ones(3))
    finally:
        torch.save({"elapsed": time.monotonic() - started}, outdir / f"timeout_rank{rank}.pt")


def run_srun(env, outdir: Path) -> None:
    """Launched by ``srun`` directly (one task per process, no torchrun): detection + one all-reduce."""
    total = distributed.all_reduce_sum(torch.tensor([env.rank + 1.0]))
    record = {
        "launcher": env.launcher,
        "rank": env.rank,
        "world_size": env.world_size,
        "master": f"{env.master_addr}:{env.master_port}",
        "backend": env.backend,
        "sum": float(total),
    }
    torch.save(record, outdir / f"srun_rank{env.rank}.pt")


def main(argv) -> int:
    scenario, outdir = argv[0], Path(argv[1])
    if scenario not in ("stats", "ddp", "core", "deepspeed", "timeout", "srun", "shutdown"):
        raise SystemExit(f"unknown scenario {scenario}")
    torch.set_num_threads(1)
    timeout_s = utils.HUNG_PEER_TIMEOUT_S if scenario == "timeout" else 60.0
    env = distributed.init_distributed(DistConfig(backend="gloo", timeout_s=timeout_s), "cpu")
    if scenario in ("stats", "core"):
        run_stats(env.rank, env.world_size, outdir)
    if scenario in ("ddp", "core"):
        run_gradient("ddp", env, outdir)
    if scenario == "deepspeed":
        run_gradient("deepspeed", env, outdir)
    if scenario == "timeout":
        run_timeout(env.rank, outdir)
    if scenario == "srun":
        run_srun(env, outdir)
    if scenario == "shutdown":
        run_shutdown(env.rank, outdir)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    exit_code = run_cli(main, sys.argv[1:])
    # Every record is written and the process group destroyed by now. Leave without interpreter teardown:
    # a gloo worker thread still finishing then can abort the process ("terminate called without an active
    # exception"; seen once in a CI run, after all four records were on disk), which would fail the launch
    # although the ranks' results are complete. What the tests check is in the records.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
