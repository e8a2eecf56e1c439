"""The projector, the API and the scripts as real processes, the way an operator runs them.

Each process writes stdout and stderr to one log file (a pipe nobody reads would fill and block
the child). A ``ProcGroup`` owns every process a test starts and stops them all at teardown,
so no test leaves a worker running into the next one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from scripts.throwaway import free_port

ROOT = Path(__file__).resolve().parents[1]


class Proc:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> int:
        """SIGKILL: no handler runs, nothing is flushed or recorded."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        return self.popen.wait(30)

    def send(self, sig: signal.Signals) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if it is still running after ``timeout`` seconds."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def wait_for_log(self, text: str, timeout: float, count: int = 1) -> bool:
        """Wait until ``text`` appears ``count`` times in the log (False if it exits first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return True
            if not self.alive():
                return self.log().count(text) >= count
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        if not self.alive():
            return
        self.popen.send_signal(signal.SIGCONT)  # in case a test left it frozen
        self.popen.send_signal(signal.SIGTERM)
        if self.wait(20) is None:
            self.kill()


class ApiProc(Proc):
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1"]
        super().__init__("api", [*cmd, "--port", str(self.port), "--no-access-log"], env, log_path)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.base_url, timeout=5) as http:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise AssertionError(f"the API exited {self.popen.returncode}:\n{self.log()}")
                try:
                    if http.get("/openapi.json").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise AssertionError(f"the API did not answer within {timeout}s:\n{self.log()}")


class ProcGroup:
    """Starts processes with DATABASE_URL / REDIS_URL in their environment; stops them all."""

    def __init__(self, log_dir: Path, database_url: str, redis_url: str) -> None:
        self.log_dir = log_dir
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            # The code of this checkout, whatever the venv's editable install points at.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
            "LOG_LEVEL": "INFO",
            # Several projectors may run at once; a test that scrapes metrics picks a free port.
            "METRICS_PORT": "0",
        }
        self.procs: list[Proc] = []

    def _log_path(self, name: str) -> Path:
        return self.log_dir / f"{len(self.procs):02d}-{name}.log"

    def projector(self, *args: str, **env: str) -> Proc:
        proc = Proc(
            "projector",
            [sys.executable, "-m", "projector", *args],
            {**self.env, **env},
            self._log_path("projector"),
        )
        self.procs.append(proc)
        return proc

    def script(self, path: str, *args: str, **env: str) -> Proc:
        name = Path(path).stem
        proc = Proc(name, [sys.executable, path, *args], {**self.env, **env}, self._log_path(name))
        self.procs.append(proc)
        return proc

    def run(self, proc: Proc, timeout: float = 120.0) -> str:
        """Wait for a process that should end by itself; assert it exits 0; return its log."""
        code = proc.wait(timeout)
        if code is None:
            proc.kill()
            raise AssertionError(f"{proc.name} still running after {timeout}s:\n{proc.log()}")
        assert code == 0, f"{proc.name} exited {code}:\n{proc.log()}"
        return proc.log()

    def catch_up(self, **env: str) -> str:
        """``python -m projector --until-caught-up``, which must exit 0."""
        return self.run(self.projector("--until-caught-up", **env))

    def api(self) -> ApiProc:
        env = {k: v for k, v in self.env.items() if k != "DATABASE_URL"}  # the API needs Redis only
        proc = ApiProc(env, self._log_path("api"))
        self.procs.append(proc)
        proc.wait_ready()
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def report(self, tail: int = 4000) -> str:
        parts = []
        for proc in self.procs:
            state = "running" if proc.alive() else f"exit {proc.popen.returncode}"
            parts.append(
                f"--- {proc.log_path.name} (pid {proc.pid}, {state}) ---\n{proc.log()[-tail:]}"
            )
        return "\n".join(parts)


def proc_group(log_dir: Path, database_url: str, redis_url: str) -> Iterator[ProcGroup]:
    """A fixture body: the group, stopped at teardown, its logs printed (shown on failure)."""
    group = ProcGroup(log_dir, database_url, redis_url)
    try:
        yield group
    finally:
        group.stop_all()
        print(group.report())
