"""A real ``mlflow server`` on 127.0.0.1 for integration tests (sqlite backend, local artifact store).

Use the fixture (``from mlflow_server import mlflow_server  # noqa: F401`` in a test module) or the class
directly when a test must stop and restart the server on the same port and store.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """Start/stop ``mlflow server`` in its own process group; the store survives restarts."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.root / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        exe = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
        cmd = [exe, "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--default-artifact-root", str(self.root / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
               "DO_NOT_TRACK": "true"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"mlflow server not healthy after {timeout_s} s: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        """Kill the server and its workers (its own process group) and wait until the port is closed."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        with _suppress_lookup():
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with _suppress_lookup():
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.1)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _suppress_lookup:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        return exc_type is ProcessLookupError


@pytest.fixture
def mlflow_server(tmp_path):
    """A running server for one test; ``.url`` is its tracking URI; stopped afterwards."""
    with MlflowServer(tmp_path / "mlflow-server") as server:
        yield server
