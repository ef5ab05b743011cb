"""MLflow tracking that never stops training: retry briefly, then buffer, then flush in order.

A training job that dies because the tracking server restarted loses hours of GPU time; a job that silently
drops metrics loses the record. :class:`Tracker` does neither:

* every call (start a run, params, metrics, tags, artifacts, end a run) is an *operation* sent in order;
* a call that fails for a transient reason (connection refused, timeout, HTTP 5xx/429) is retried a few
  times with exponential backoff, then the operation is buffered in memory **and** appended to a JSONL spool
  file, and the tracker goes offline: later calls are buffered at once (no waiting) and a reconnect is tried
  at most every ``reconnect_interval_s``;
* when the server answers again (or at :meth:`Tracker.close`, or :meth:`Tracker.flush`), buffered
  operations are replayed in their original order (runs created while offline get their ids then);
* a spool left by a crashed process is replayed with :func:`replay_spool`.

MLflow's own HTTP retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7 with backoff: minutes) and timeout
(``MLFLOW_HTTP_REQUEST_TIMEOUT``, default 120 s) are set low by the tracker, so a dead server costs
milliseconds, not minutes; this tracker does the retrying.

Runs are addressed by :class:`RunHandle`; logging calls without ``run=`` go to the innermost open run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from customcrafter.orchestration.registry import display_error, display_uri

__all__ = ["Tracker", "RunHandle", "flatten_params", "replay_spool", "is_transient_error"]

logger = logging.getLogger(__name__)

_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_LENGTH = 6000
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
# Connection failures and gateway/proxy errors as MLflow's REST layer words them.
_TRANSIENT_MESSAGE = re.compile(r"failed with (timeout )?exception|failed with error code (5\d\d|429)")


def flatten_params(config: BaseModel | Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, str]:
    """Flatten a (nested) pydantic config or dict into ``{"a.b.c": "value"}`` strings for ``log_params``.

    Lists and other non-mapping values are JSON-encoded (stable, readable in the UI); None becomes "None".
    """
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, BaseModel | Mapping) and value:
            flat.update(flatten_params(value, name, sep))
        elif isinstance(value, str):
            flat[name] = value
        elif value is None or isinstance(value, bool | int | float):
            flat[name] = str(value)
        else:
            flat[name] = json.dumps(value, sort_keys=True, default=str)
    return flat


def is_transient_error(exc: BaseException) -> bool:
    """True when the server is unreachable or overloaded (retry later); False for a rejected request."""
    import requests
    from mlflow.exceptions import MlflowException

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout
                      | ConnectionError | TimeoutError):
            return True
        if isinstance(exc, MlflowException):
            if _TRANSIENT_MESSAGE.search(str(exc)):
                return True
            if exc.error_code in _TRANSIENT_CODES:
                return True
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass
class RunHandle:
    """A run as the tracker knows it: ``key`` is local and stable; ``run_id`` is set once MLflow created it."""

    key: str
    name: str
    tracker: Tracker = field(repr=False)

    @property
    def run_id(self) -> str | None:
        return self.tracker._run_ids.get(self.key)


class Tracker:
    """Resilient MLflow logging for one experiment (see the module docstring for the guarantees)."""

    def __init__(self, tracking_uri: str, experiment: str, *, spool_path: str | Path | None = None,
                 max_retries: int = 2, backoff_s: float = 0.2, reconnect_interval_s: float = 5.0,
                 http_timeout_s: float = 5.0, close_timeout_s: float = 30.0):
        from mlflow import MlflowClient

        if max_retries < 0 or backoff_s < 0 or reconnect_interval_s < 0:
            raise ValueError("max_retries, backoff_s and reconnect_interval_s must be >= 0")
        # MLflow's own retry loop would otherwise block each call for minutes while the server is down.
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(max(1, http_timeout_s)))
        self.tracking_uri = tracking_uri
        # what the logs show: a password in the URI (https://user:secret@host) as *** (pod logs are widely read)
        self.shown_uri = display_uri(tracking_uri)
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.reconnect_interval_s = reconnect_interval_s
        self.close_timeout_s = close_timeout_s
        spool_dir = Path(os.environ.get("CUSTOMCRAFTER_SPOOL_DIR", Path.home() / ".cache/customcrafter/mlflow-spool"))
        self.spool_path = Path(spool_path) if spool_path else spool_dir / f"{experiment}-{uuid.uuid4().hex}.jsonl"
        self._pending: list[dict[str, Any]] = []
        self._run_ids: dict[str, str] = {}
        self._stack: list[RunHandle] = []
        self._experiment_id: str | None = None
        self._offline_since: float | None = None
        self._last_attempt = 0.0
        if self.spool_path.is_file() and self.spool_path.stat().st_size:
            self._pending = _read_spool(self.spool_path)
            logger.warning("resuming %d buffered MLflow operations from %s", len(self._pending), self.spool_path)

    # ------------------------------------------------------------------------------- public API
    @property
    def pending(self) -> int:
        """Operations buffered and not yet accepted by the server."""
        return len(self._pending)

    @property
    def online(self) -> bool:
        return self._offline_since is None

    @property
    def active_run(self) -> RunHandle | None:
        return self._stack[-1] if self._stack else None

    @contextlib.contextmanager
    def start_run(self, name: str, tags: Mapping[str, Any] | None = None,
                  parent: RunHandle | None = None) -> Iterator[RunHandle]:
        """Open a run (nested under ``parent`` if given) for the ``with`` block; FAILED if it raises."""
        handle = RunHandle(key=uuid.uuid4().hex, name=name, tracker=self)
        self._submit({"op": "create_run", "key": handle.key, "name": name,
                      "parent": parent.key if parent else None,
                      "tags": {k: str(v) for k, v in (tags or {}).items()}})
        self._stack.append(handle)
        status = "FINISHED"
        try:
            yield handle
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self._stack.remove(handle)
            self._submit({"op": "end_run", "key": handle.key, "status": status})

    @contextlib.contextmanager
    def child_run(self, subject: str, method: str, tags: Mapping[str, Any] | None = None,
                  parent: RunHandle | None = None) -> Iterator[RunHandle]:
        """A run per subject × method, nested under ``parent`` (default: the innermost open run)."""
        parent = parent or self.active_run
        if parent is None:
            raise RuntimeError("child_run: no parent run is open (use `with tracker.start_run(...)` first)")
        all_tags = {"subject": subject, "method": method, **(tags or {})}
        with self.start_run(f"{subject}/{method}", tags=all_tags, parent=parent) as handle:
            yield handle

    def attach_run(self, run_id: str, name: str = "") -> RunHandle:
        """A handle on a run that already exists (created by another step or process); never ended here."""
        if not run_id:
            raise ValueError("attach_run: run_id is empty")
        self._run_ids[run_id] = run_id
        return RunHandle(key=run_id, name=name or run_id, tracker=self)

    @contextlib.contextmanager
    def use_run(self, handle: RunHandle) -> Iterator[RunHandle]:
        """Make ``handle`` the default target of logging calls in the block (without starting or ending it)."""
        self._stack.append(handle)
        try:
            yield handle
        finally:
            self._stack.remove(handle)

    def log_params(self, params: BaseModel | Mapping[str, Any], run: RunHandle | None = None) -> None:
        """Log a config (pydantic model or nested dict), flattened to dotted keys."""
        flat = flatten_params(params)
        for name, value in flat.items():
            if len(value) > _MAX_PARAM_LENGTH:
                logger.warning("param %s is %d characters; truncated to %d", name, len(value), _MAX_PARAM_LENGTH)
                flat[name] = value[:_MAX_PARAM_LENGTH]
        items = sorted(flat.items())
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self._submit({"op": "log_params", "key": self._key(run),
                          "params": dict(items[i:i + _MAX_PARAMS_PER_BATCH])})

    def log_metric(self, key: str, value: float, step: int = 0, run: RunHandle | None = None) -> None:
        self.log_metrics({key: value}, step=step, run=run)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0, run: RunHandle | None = None) -> None:
        timestamp = int(time.time() * 1000)
        items = [[k, float(v), int(step), timestamp] for k, v in metrics.items()]
        for i in range(0, len(items), _MAX_METRICS_PER_BATCH):
            self._submit({"op": "log_metrics", "key": self._key(run), "metrics": items[i:i + _MAX_METRICS_PER_BATCH]})

    def set_tags(self, tags: Mapping[str, Any], run: RunHandle | None = None) -> None:
        self._submit({"op": "set_tags", "key": self._key(run), "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, run: RunHandle | None = None) -> None:
        """Upload a file. While offline only the path is buffered: the file must still exist at flush time."""
        self._submit({"op": "log_artifact", "key": self._key(run), "path": str(Path(path).resolve()),
                      "artifact_path": artifact_path})

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None,
                      run: RunHandle | None = None) -> None:
        """Upload a folder's contents (same buffering caveat as :meth:`log_artifact`)."""
        self._submit({"op": "log_artifacts", "key": self._key(run), "path": str(Path(directory).resolve()),
                      "artifact_path": artifact_path})

    def flush(self, timeout_s: float | None = None) -> int:
        """Replay buffered operations now, retrying until done or ``timeout_s``; return how many remain."""
        deadline = time.monotonic() + (timeout_s or 0)
        delay = self.backoff_s or 0.1
        while True:
            self._drain()
            if not self._pending or time.monotonic() >= deadline:
                return len(self._pending)
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 5.0)

    def close(self) -> int:
        """Flush (up to ``close_timeout_s``); if the server is still away, keep the spool and say where it is."""
        left = self.flush(timeout_s=self.close_timeout_s)
        if left:
            logger.error("MLflow at %s unreachable: %d operations kept in %s (replay with "
                         "customcrafter.orchestration.tracking.replay_spool)", self.shown_uri, left, self.spool_path)
        return left

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------- internals
    def _key(self, run: RunHandle | None) -> str:
        handle = run or self.active_run
        if handle is None:
            raise RuntimeError("no run is open: use `with tracker.start_run(...)` or pass run=")
        return handle.key

    def _submit(self, op: dict[str, Any]) -> None:
        """Send ``op`` now if possible, else buffer it; order is always preserved."""
        if self._pending or not self.online:
            self._buffer(op)
            if time.monotonic() - self._last_attempt >= self.reconnect_interval_s:
                self._drain()
            return
        for attempt in range(self.max_retries + 1):
            try:
                self._apply(op)
                return
            except Exception as exc:
                if not is_transient_error(exc):
                    self._reject(op, exc)
                    return
                if attempt < self.max_retries:
                    time.sleep(self.backoff_s * 2 ** attempt)
                else:
                    logger.warning("MLflow at %s unreachable (%s); buffering to %s", self.shown_uri,
                                   self._short(exc), self.spool_path)
        self._go_offline()
        self._buffer(op)

    def _drain(self) -> None:
        """Try buffered operations in order; stop at the first transient failure."""
        self._last_attempt = time.monotonic()
        sent = 0
        try:
            while self._pending:
                op = self._pending[0]
                try:
                    self._apply(op)
                except Exception as exc:
                    if is_transient_error(exc):
                        self._go_offline()
                        return
                    self._reject(op, exc)
                self._pending.pop(0)
                sent += 1
                if op["op"] == "create_run":  # on disk at once: a process killed now must not create it again
                    self._rewrite_spool()
        finally:
            if sent:
                self._rewrite_spool()
        if self._offline_since is not None:
            logger.info("MLflow at %s reachable again after %.1f s; flushed %d buffered operations",
                        self.shown_uri, time.monotonic() - self._offline_since, sent)
        self._offline_since = None

    def _go_offline(self) -> None:
        if self._offline_since is None:
            self._offline_since = time.monotonic()
        self._last_attempt = time.monotonic()

    def _resolved(self, op: dict[str, Any]) -> dict[str, Any]:
        """``op`` with the run ids already known filled in, so its spool line stands on its own in a later
        process (one that replays the spool knows nothing of this process's runs)."""
        if op.get("key") in self._run_ids and not op.get("run_id"):
            op = {**op, "run_id": self._run_ids[op["key"]]}
        if op.get("parent") in self._run_ids and not op.get("parent_run_id"):
            op = {**op, "parent_run_id": self._run_ids[op["parent"]]}
        return op

    def _buffer(self, op: dict[str, Any]) -> None:
        op = self._resolved(op)
        self._pending.append(op)
        self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        with self.spool_path.open("a") as fh:
            fh.write(json.dumps(op) + "\n")

    def _rewrite_spool(self) -> None:
        if not self._pending:
            self.spool_path.unlink(missing_ok=True)
            return
        # runs created since these were buffered: their ids go into the lines that are left
        self._pending = [self._resolved(op) for op in self._pending]
        tmp = self.spool_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(op) + "\n" for op in self._pending))
        tmp.replace(self.spool_path)

    def _reject(self, op: dict[str, Any], exc: Exception) -> None:
        # The server answered and said no (bad value, ...): retrying cannot help; training goes on.
        logger.error("MLflow rejected %s for run %s: %s", op["op"], op.get("key"), self._short(exc))

    def _short(self, exc: BaseException) -> str:
        """``exc`` in one line, the password of the tracking URI masked (MLflow's messages quote the URL)."""
        return display_error(exc, self.tracking_uri)

    def _experiment(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            self._experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)
        return self._experiment_id

    def _run_id(self, op: dict[str, Any]) -> str:
        run_id = op.get("run_id") or self._run_ids.get(op["key"])
        if run_id is None:
            raise RuntimeError(f"{op['op']}: run {op['key']} was never created")
        return run_id

    def _apply(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind = op["op"]
        if kind == "create_run":
            tags = dict(op["tags"])
            tags["mlflow.runName"] = op["name"]
            if op.get("parent"):
                tags["mlflow.parentRunId"] = op.get("parent_run_id") or self._run_ids[op["parent"]]
            run = self.client.create_run(self._experiment(), tags=tags, run_name=op["name"])
            self._run_ids[op["key"]] = run.info.run_id
        elif kind == "log_params":
            self.client.log_batch(self._run_id(op), params=[Param(k, v) for k, v in op["params"].items()])
        elif kind == "log_metrics":
            self.client.log_batch(self._run_id(op), metrics=[Metric(k, v, ts, s) for k, v, s, ts in op["metrics"]])
        elif kind == "set_tags":
            self.client.log_batch(self._run_id(op), tags=[RunTag(k, v) for k, v in op["tags"].items()])
        elif kind == "log_artifact":
            self.client.log_artifact(self._run_id(op), op["path"], op.get("artifact_path"))
        elif kind == "log_artifacts":
            self.client.log_artifacts(self._run_id(op), op["path"], op.get("artifact_path"))
        elif kind == "end_run":
            self.client.set_terminated(self._run_id(op), status=op["status"])
        else:
            raise ValueError(f"unknown tracking operation {kind!r}")


def _read_spool(path: Path) -> list[dict[str, Any]]:
    ops = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            ops.append(json.loads(line))
        except json.JSONDecodeError:
            logger.error("%s:%d: unreadable spool line skipped (a write cut short by a crash?)", path, n)
    return ops


def replay_spool(tracking_uri: str, spool_path: str | Path, experiment: str, timeout_s: float = 60.0) -> int:
    """Send the operations a crashed process left in ``spool_path``; return how many could not be sent."""
    tracker = Tracker(tracking_uri, experiment, spool_path=spool_path)
    return tracker.flush(timeout_s=timeout_s)
