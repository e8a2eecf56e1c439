"""The framework's limit, for the benchmark: the dashboard route answering constant bytes.

``BENCH_CONST_BODY=/path/to/body.json uvicorn scripts.bench_const_app:app``. The same FastAPI
route (and handle validation) as the API, returning the file's bytes, which the benchmark fills
with the API's real answer for the heavy tenant, so the body is the same size. Like the API, it
freezes the objects made at start-up so the garbage collector does not walk them.
"""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path as FilePath
from typing import Annotated

from fastapi import FastAPI, Path, Request
from fastapi.responses import Response

from models.handles import HANDLE_PATTERN

BODY_ENV = "BENCH_CONST_BODY"

Handle = Annotated[str, Path(pattern=HANDLE_PATTERN)]


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.body = FilePath(os.environ[BODY_ENV]).read_bytes()
    gc.collect()
    gc.freeze()
    yield


app = FastAPI(title="constant body (benchmark)", lifespan=_lifespan)


@app.get("/v1/users/{handle}/dashboard")
async def dashboard(handle: Handle, request: Request) -> Response:
    return Response(request.app.state.body, media_type="application/json")
