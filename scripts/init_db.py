"""Create or upgrade the platform schema and what the projector needs in it. Safe to re-run."""

from __future__ import annotations

import sys

from sqlalchemy import create_engine

from models.settings import get_projector_settings
from projector.schema import init_schema


def main() -> int:
    engine = create_engine(get_projector_settings().database_url)
    try:
        init_schema(engine)
    finally:
        engine.dispose()
    print("schema ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
