"""What each process loads: the tree's layers, kept apart where it matters at run time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _loaded(module: str, packages: tuple[str, ...]) -> list[str]:
    """Which of ``packages`` a fresh interpreter holds after importing ``module``."""
    code = (
        f"import json, sys, {module}\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(packages)!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    found: list[str] = json.loads(done.stdout)
    return found


@pytest.mark.parametrize("module", ["projector.__main__", "scripts.rebuild"])
def test_the_worker_and_the_rebuild_load_neither_the_web_framework_nor_the_orm(
    module: str,
) -> None:
    # The write side never needs FastAPI; and SQLAlchemy's import alone cost every start of the
    # worker 0.13 s, a tenth of catching up on a 500k-event backlog (projector/db.py).
    assert _loaded(module, ("fastapi", "sqlalchemy", "starlette")) == []


def test_the_api_does_not_load_the_orm_or_the_driver() -> None:
    # The read side answers from Redis alone.
    assert _loaded("api.main", ("sqlalchemy", "psycopg")) == []
