"""``python -m projector [--until-caught-up]``: the composition root of the worker."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
from types import FrameType

from prometheus_client import disable_created_metrics

from models.settings import get_projector_settings
from projector import logs
from projector.db import Database
from projector.leader import Leadership
from projector.metrics import Metrics, PrometheusMetrics
from projector.sink import connect
from projector.worker import Projector

log = logging.getLogger("projector")


def _install_signals(stop: threading.Event) -> None:
    def handle(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            # Second signal: the operator means it. The cursor moves atomically with the
            # state, so stopping mid-batch loses nothing; the batch is simply done again.
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: finishing the batch in hand, then exiting", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def _metrics(database_url: str, port: int, host: str) -> Metrics:
    if not port:
        return Metrics()
    # Counters' *_created twins only double the page here; this process's choice, made at run
    # time (it is prometheus_client's process-wide switch).
    disable_created_metrics()  # type: ignore[no-untyped-call]
    metrics = PrometheusMetrics(database_url)
    try:
        # Before the first batch, so a scrape during a long first rebuild shows its progress.
        metrics.serve(port, host)
    except OSError as exc:
        # A second projector on the same host (a standby) must still run: without metrics
        # rather than not at all.
        log.warning("metrics off: cannot listen on %s:%d (%s); set METRICS_PORT", host, port, exc)
        return Metrics()
    log.info("metrics on http://%s:%d/metrics", host, port)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m projector", description=__doc__)
    parser.add_argument(
        "--until-caught-up",
        action="store_true",
        help="apply everything committed before start, then exit 0",
    )
    args = parser.parse_args(argv)
    settings = get_projector_settings()
    logs.setup(settings.log_format)
    metrics = _metrics(settings.database_url, settings.metrics_port, settings.metrics_host)
    db = Database(settings.database_url)
    client = connect(settings.redis_url)
    stop = threading.Event()
    _install_signals(stop)
    leadership = Leadership(settings.database_url, client, settings.leader_lease_seconds)
    projector = Projector(db, client, settings, leadership=leadership, metrics=metrics)
    log.info("projector starting%s", " (until caught up)" if args.until_caught_up else "")
    # What start-up made (modules, classes: tens of thousands of objects of pydantic, redis-py)
    # lives as long as the process; frozen, the collector stops walking it on every full
    # collection, and at exit (0.12 s of a cold 500k backlog). A batch makes its objects in
    # bursts (a backlog batch ~200k: parsed documents, events, rendered ones) that reference
    # counting frees; collecting every 700 of them found nothing and cost 0.045 s a batch.
    gc.freeze()
    gc.set_threshold(100_000, 20, 20)
    try:
        projector.run(stop, until_caught_up=args.until_caught_up)
    finally:
        leadership.release()
        if isinstance(metrics, PrometheusMetrics):
            metrics.close()
        db.close()
        client.close()
    if projector.head is not None:
        log.info(
            "projector stopped: generation %d, chain height %d applied",
            projector.head.gen,
            projector.head.height,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
