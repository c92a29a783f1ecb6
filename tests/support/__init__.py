"""What the tests share, one module per job. Fixtures built from these live in ``tests/conftest.py``.

- :mod:`support.env`: :func:`~support.env.child_env`, the environment of every child process.
- :mod:`support.run`: commands (``python -m``, torchrun), :func:`~support.run.run_command` and friends, a
  background process, the in-process CLI runner, and the one-line-error assertion.
- :mod:`support.demo`: the demo data set (:func:`~support.demo.build_demo_data`), hand-made shards, and the
  overrides of a tiny training run (:func:`~support.demo.tiny_overrides`).
- :mod:`support.checkpoints`: reading a run's checkpoints without the package's own reader, and an exact,
  key-by-key comparison of two payloads.
- :mod:`support.dist_pipelines` + :mod:`support.dist_workers`: small PCA / K-means / EM / gradient pipelines
  that run in one process and under torchrun, to compare W ranks with one.
- :mod:`support.slurm`: a throw-away single-node SLURM cluster.
- :mod:`support.net`: free loopback ports.
- :mod:`support.parallel`: running in two processes (pytest-xdist): groups, ``alone`` tests, fixtures built
  once per run.
- :mod:`support.sync_counter`: counts the calls that would make the host wait for a GPU, on a CPU run.

Tests import ``support`` because pytest puts ``tests/`` on ``sys.path`` (rootdir-relative test modules
without ``__init__.py``). Benchmarks never import it: what tests and benchmarks share lives in
:mod:`primaps_dist.testing`.
"""
