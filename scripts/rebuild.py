"""Rebuild the whole read model from Postgres beside the live one, then swap it in atomically.

The API keeps serving the old generation until the swap; a running projector notices the swap
(its next write is fenced) and carries on from the new generation's position.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time

from models.settings import get_projector_settings
from projector.db import make_engine
from projector.rebuild import collect_garbage, new_generation, snapshot_into, swap_in
from projector.sink import Mode, Sink, connect
from projector.worker import Projector


def _progress(done: int, total: int) -> None:
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done >= total else ""
    print(
        f"\r  owners [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, flush=True
    )


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="scripts/rebuild.py", description=__doc__).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_projector_settings()
    engine = make_engine(settings.database_url)
    client = connect(settings.redis_url)
    started = time.monotonic()
    try:
        gen = new_generation(client)
        print(f"building generation {gen} from one Postgres snapshot")
        snapshot_into(engine, client, gen, progress=_progress)
        Projector(engine, client, settings, gen=gen, mode=Mode.BUILDING).run(
            threading.Event(), until_caught_up=True
        )
        old = swap_in(client, gen)
        freed = collect_garbage(client)
        head = Sink(client).head(gen)
    finally:
        engine.dispose()
    print(
        f"generation {gen} is live (replaced {old or 'nothing'}), at event seq "
        f"{head.cursor.events.n if head else '?'}; {freed} old keys freed; "
        f"{time.monotonic() - started:.2f}s"
    )
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
