"""A small in-process stand-in for the KFP v2 REST API (``/apis/v2beta1``), for submission tests.

It answers what ``kfp.Client`` and the ``kfp`` CLI call to create runs and recurring runs, and records every
request (method, path, query, JSON body, headers) so tests can assert what was submitted. Start it with
``with KfpStub() as stub: ... stub.url``; it binds 127.0.0.1 on a free port and stops on exit.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

API = "/apis/v2beta1"


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    headers: dict[str, str]  # lower-case names


@dataclass
class _State:
    requests: list[Recorded] = field(default_factory=list)
    experiments: list[dict] = field(default_factory=list)
    runs: dict[str, dict] = field(default_factory=dict)
    recurring_runs: dict[str, dict] = field(default_factory=dict)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _matches(experiment: dict, filter_json: str | None) -> bool:
    """Apply the EQUALS predicates of a KFP list filter (all the client uses to find by name)."""
    if not filter_json:
        return True
    predicates = json.loads(filter_json).get("predicates", [])
    for pred in predicates:
        value = pred.get("string_value", pred.get("stringValue"))
        if pred.get("operation") in ("EQUALS", 1) and experiment.get(pred.get("key")) != value:
            return False
    return True


class _Handler(BaseHTTPRequestHandler):
    state: _State  # set per server class

    def log_message(self, *args):  # keep test output clean
        pass

    def _record(self) -> Recorded:
        parsed = urlparse(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        rec = Recorded(self.command, parsed.path, parse_qs(parsed.query), body,
                       {k.lower(): v for k, v in self.headers.items()})
        self.state.requests.append(rec)
        return rec

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server API)
        rec = self._record()
        state = self.state
        if rec.path == f"{API}/healthz":
            return self._send(200, {"multi_user": False})
        if rec.path == f"{API}/experiments":
            found = [e for e in state.experiments if _matches(e, (rec.query.get("filter") or [None])[0])]
            return self._send(200, {"experiments": found, "total_size": len(found)})
        if rec.path.startswith(f"{API}/experiments/"):
            exp_id = rec.path.rsplit("/", 1)[1]
            for e in state.experiments:
                if e["experiment_id"] == exp_id:
                    return self._send(200, e)
        if rec.path.startswith(f"{API}/runs/"):
            run = state.runs.get(rec.path.rsplit("/", 1)[1])
            if run:
                return self._send(200, run)
        if rec.path.startswith(f"{API}/recurringruns/"):
            job = state.recurring_runs.get(rec.path.rsplit("/", 1)[1])
            if job:
                return self._send(200, job)
        return self._send(404, {"error": f"not found: {rec.path}", "code": 5})

    def do_POST(self):  # noqa: N802
        rec = self._record()
        body = rec.body or {}
        state = self.state
        if rec.path == f"{API}/experiments":
            exp = {**body, "experiment_id": str(uuid.uuid4()), "created_at": _now(),
                   "storage_state": "AVAILABLE"}
            state.experiments.append(exp)
            return self._send(200, exp)
        if rec.path == f"{API}/runs":
            run = {**body, "run_id": str(uuid.uuid4()), "created_at": _now(), "state": "PENDING",
                   "storage_state": "AVAILABLE"}
            state.runs[run["run_id"]] = run
            return self._send(200, run)
        if rec.path == f"{API}/recurringruns":
            job = {**body, "recurring_run_id": str(uuid.uuid4()), "created_at": _now(),
                   "updated_at": _now(), "status": "ENABLED" if body.get("mode") != "DISABLE" else "DISABLED"}
            state.recurring_runs[job["recurring_run_id"]] = job
            return self._send(200, job)
        return self._send(404, {"error": f"not found: {rec.path}", "code": 5})


class KfpStub:
    """``with KfpStub() as stub:`` serves on ``stub.url``; ``stub.requests`` lists what arrived."""

    def __init__(self) -> None:
        self.state = _State()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[Recorded]:
        return self.state.requests

    def posted(self, path_suffix: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and r.path == f"{API}/{path_suffix}"]

    def __enter__(self) -> KfpStub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
