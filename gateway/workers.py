"""Metrics across worker processes (``workers`` > 1): the shared directory of prometheus_client's
multi-process mode, and each worker's process figures in it.

The supervisor makes a private directory (0700) before forking (:func:`metrics_directory`) and
names it in ``PROMETHEUS_MULTIPROC_DIR``, where prometheus_client's memory-mapped values look for
it; every worker switches prometheus_client to those values (:func:`enable_multiprocess`)
before it creates a metric, so each counter, gauge and histogram writes its own file there. The
worker serving ``/metrics`` reads them all (``MultiProcessCollector``): counters and histograms
sum over every worker that ever ran (a restarted worker's counts stay), gauges combine as their
``multiprocess_mode`` says. When a worker exits, :func:`worker_exited` drops its live gauges;
the directory is removed when the supervisor exits.

Process figures (memory, CPU, file descriptors) are per process: in multi-process mode each
worker publishes its own as ``liveall`` gauges (one series per live worker, label ``pid``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector, values
from prometheus_client.multiprocess import mark_process_dead

ENV = "PROMETHEUS_MULTIPROC_DIR"
# prometheus_client's ProcessCollector samples, published as gauges by each worker
_PROCESS_SAMPLES = {
    "process_virtual_memory_bytes": "Virtual memory size in bytes.",
    "process_resident_memory_bytes": "Resident memory size in bytes.",
    "process_start_time_seconds": "Start time of the process since unix epoch in seconds.",
    "process_cpu_seconds_total": "Total user and system CPU time spent in seconds.",
    "process_open_fds": "Number of open file descriptors.",
    "process_max_fds": "Maximum number of open file descriptors.",
}


@contextlib.contextmanager
def metrics_directory() -> Iterator[Path]:
    """A private (0700) directory for the workers' metric files, named in the environment the
    workers inherit, removed on exit."""
    path = Path(tempfile.mkdtemp(prefix="svidgate-metrics-"))
    previous = os.environ.get(ENV)
    os.environ[ENV] = str(path)
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


def enable_multiprocess() -> None:
    """In a worker, before any metric exists: values live in the shared directory's files."""
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def worker_exited(directory: Path, pid: int) -> None:
    """A worker is gone: its live gauges (open connections, process figures) no longer count."""
    mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


class ProcessMetrics:
    """The ``process_*`` metrics: prometheus_client's own collector in a single process; in
    multi-process mode each worker's figures as ``liveall`` gauges, refreshed by
    :meth:`publish`."""

    def __init__(self, registry: CollectorRegistry, *, shared: bool) -> None:
        self._source: ProcessCollector | None = None
        self._gauges: dict[str, Gauge] = {}
        if not shared:
            ProcessCollector(registry=registry)
            return
        self._source = ProcessCollector(registry=None)
        self._gauges = {
            name: Gauge(name, doc, registry=registry, multiprocess_mode="liveall")
            for name, doc in _PROCESS_SAMPLES.items()
        }

    def publish(self) -> None:
        if self._source is None:
            return
        for family in self._source.collect():
            for sample in family.samples:
                gauge = self._gauges.get(sample.name)
                if gauge is not None:
                    gauge.set(sample.value)
