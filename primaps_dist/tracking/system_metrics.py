"""System metrics (CPU, memory, disk, network, GPU) sampled by MLflow's collectors on a thread.

Samples go into a queue that the tracker drains on the training thread, so they take the same journaled
path as every other metric and survive an outage. They are logged with the current training step.
"""

from __future__ import annotations

import queue
import threading

from primaps_dist.tracking.common import logger, short


class SystemMetricsSampler:
    """Runs MLflow's ``SystemMetricsMonitor`` collectors every ``sampling_interval_s`` into :attr:`samples`."""

    def __init__(self, tracking_uri: str, sampling_interval_s: float = 10.0, samples_before_logging: int = 1):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        options = dict(run_id="unused", sampling_interval=sampling_interval_s,
                       samples_before_logging=samples_before_logging)
        try:  # its (unused) logger builds a client: point it at our URI, not a default ./mlflow.db
            self._monitor = SystemMetricsMonitor(**options, tracking_uri=tracking_uri)
        except TypeError:  # MLflow < 2.16 has no tracking_uri argument
            self._monitor = SystemMetricsMonitor(**options)
        self.samples: queue.SimpleQueue[dict[str, float]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="primaps-system-metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        monitor = self._monitor
        prefix = "system/" + (f"{monitor.node_id}/" if monitor.node_id else "")
        while not self._stop.is_set():
            try:
                for _ in range(int(monitor.samples_before_logging)):
                    monitor.collect_metrics()
                    if self._stop.wait(float(monitor.sampling_interval)):
                        return
                aggregated = monitor.aggregate_metrics()
                for collector in monitor.monitors:
                    collector.clear_metrics()
            except Exception as err:  # noqa: BLE001 - a broken collector must not touch training
                logger.warning("system metrics sampling stopped: %s", short(err))
                return
            self.samples.put({prefix + k: float(v) for k, v in aggregated.items()})

    def take(self) -> list[dict[str, float]]:
        """The samples collected since the last call, oldest first."""
        taken = []
        while True:
            try:
                values = self.samples.get_nowait()
            except queue.Empty:
                return taken
            if values:
                taken.append(values)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
