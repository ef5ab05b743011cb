"""The resilient tracker: runs, params and metrics land in MLflow; an outage loses nothing and stops nothing."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow_server import MlflowServer

from customcrafter.config import StrictModel
from customcrafter.orchestration.tracking import Tracker, flatten_params, is_transient_error, replay_spool


class _Optim(StrictModel):
    lr: float = 1e-4
    betas: list[float] = [0.9, 0.999]


class _Train(StrictModel):
    method: str = "customcrafter"
    steps: int = 10
    optim: _Optim = _Optim()
    token: str | None = None


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def experiment() -> str:
    return f"exp-{uuid.uuid4().hex[:8]}"


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key)]


_DOWN = MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch failed with exception "
                        "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded (Connection refused)")


def test_flatten_params_nested_pydantic_config():
    flat = flatten_params(_Train())
    assert flat == {"method": "customcrafter", "steps": "10", "optim.lr": "0.0001",
                    "optim.betas": "[0.9, 0.999]", "token": "None"}
    assert flatten_params({"a": {"b": {"c": 1}}, "d": {}}) == {"a.b.c": "1", "d": "{}"}


def test_transient_error_classification():
    assert is_transient_error(_DOWN)
    assert is_transient_error(ConnectionRefusedError())
    assert is_transient_error(MlflowException("x", error_code=TEMPORARILY_UNAVAILABLE))
    assert is_transient_error(MlflowException("API request to endpoint /x failed with error code 502 != 200"))
    assert not is_transient_error(MlflowException("bad value", error_code=INVALID_PARAMETER_VALUE))
    assert not is_transient_error(MlflowException("a local bug"))  # INTERNAL_ERROR, but not from the network
    assert not is_transient_error(ValueError("nope"))


def test_parent_and_child_runs_with_params_metrics_tags(sqlite_uri, experiment, tmp_path):
    artifact = tmp_path / "report.md"
    artifact.write_text("# report")
    with Tracker(sqlite_uri, experiment, spool_path=tmp_path / "spool.jsonl") as tracker:
        with tracker.start_run("pipeline", tags={"data_revision": "abc"}) as parent:
            with tracker.child_run("dog", "customcrafter") as child:
                tracker.log_params(_Train())
                for step in range(3):
                    tracker.log_metric("loss", 1.0 / (step + 1), step=step)
                tracker.log_metrics({"dino_i": 0.5, "clip_t": 0.3})
                tracker.set_tags({"stage": "trained"})
                tracker.log_artifact(artifact, artifact_path="reports")
            tracker.log_metric("subjects", 1)  # back on the parent
    client = MlflowClient(sqlite_uri)
    p, c = client.get_run(parent.run_id), client.get_run(child.run_id)
    assert c.data.tags["mlflow.parentRunId"] == parent.run_id
    assert (c.data.tags["subject"], c.data.tags["method"], c.data.tags["stage"]) == ("dog", "customcrafter", "trained")
    assert c.info.run_name == "dog/customcrafter" and p.data.tags["data_revision"] == "abc"
    assert c.data.params["optim.lr"] == "0.0001" and c.data.params["method"] == "customcrafter"
    assert _history(sqlite_uri, child.run_id, "loss") == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert c.data.metrics["dino_i"] == 0.5 and p.data.metrics["subjects"] == 1
    assert [a.path for a in client.list_artifacts(child.run_id, "reports")] == ["reports/report.md"]
    assert p.info.status == c.info.status == "FINISHED"
    assert not (tmp_path / "spool.jsonl").exists()


def test_exception_in_block_marks_run_failed(sqlite_uri, experiment, tmp_path):
    tracker = Tracker(sqlite_uri, experiment, spool_path=tmp_path / "s.jsonl")
    with pytest.raises(RuntimeError, match="boom"), tracker.start_run("pipeline") as run:
        raise RuntimeError("boom")
    assert MlflowClient(sqlite_uri).get_run(run.run_id).info.status == "FAILED"


def test_outage_buffers_in_memory_and_spool_then_flushes_in_order(sqlite_uri, experiment, tmp_path, monkeypatch):
    spool = tmp_path / "spool.jsonl"
    tracker = Tracker(sqlite_uri, experiment, spool_path=spool, backoff_s=0.01, reconnect_interval_s=3600)
    real_log_batch = tracker.client.log_batch
    with tracker.start_run("pipeline") as run:
        tracker.log_metric("loss", 0.0, step=0)
        monkeypatch.setattr(tracker.client, "log_batch", lambda *a, **k: (_ for _ in ()).throw(_DOWN))
        started = time.monotonic()
        for step in range(1, 200):
            tracker.log_metric("loss", float(step), step=step)
        assert time.monotonic() - started < 2.0, "an outage must not slow training down"
        assert not tracker.online and tracker.pending == 199
        lines = [json.loads(line) for line in spool.read_text().splitlines()]
        assert [op["metrics"][0][2] for op in lines] == list(range(1, 200))
        assert all(op["run_id"] == run.run_id for op in lines)
        monkeypatch.setattr(tracker.client, "log_batch", real_log_batch)
    # end_run was buffered behind the metrics; close() flushes everything in order
    assert tracker.close() == 0
    assert [s for s, _ in _history(sqlite_uri, run.run_id, "loss")] == list(range(200))
    assert MlflowClient(sqlite_uri).get_run(run.run_id).info.status == "FINISHED"
    assert not spool.exists()


def test_run_started_during_outage_is_created_on_flush(sqlite_uri, experiment, tmp_path, monkeypatch):
    tracker = Tracker(sqlite_uri, experiment, spool_path=tmp_path / "s.jsonl", max_retries=0,
                      reconnect_interval_s=3600)
    with tracker.start_run("pipeline") as parent:
        real_create = tracker.client.create_run
        monkeypatch.setattr(tracker.client, "create_run", lambda *a, **k: (_ for _ in ()).throw(_DOWN))
        with tracker.child_run("cat", "dreamvideo") as child:
            tracker.log_params({"steps": 5})
            tracker.log_metric("loss", 1.5, step=7)
        assert child.run_id is None and tracker.pending == 4
        monkeypatch.setattr(tracker.client, "create_run", real_create)
    assert tracker.flush() == 0
    run = MlflowClient(sqlite_uri).get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.params == {"steps": "5"} and _history(sqlite_uri, child.run_id, "loss") == [(7, 1.5)]


def test_spool_left_by_a_crashed_process_is_replayed(sqlite_uri, experiment, tmp_path, monkeypatch):
    spool = tmp_path / "crash.jsonl"
    tracker = Tracker(sqlite_uri, experiment, spool_path=spool, max_retries=0, reconnect_interval_s=3600)
    monkeypatch.setattr(tracker.client, "create_run", lambda *a, **k: (_ for _ in ()).throw(_DOWN))
    with tracker.start_run("pipeline"):
        for step in range(5):
            tracker.log_metric("loss", step * 0.1, step=step)
    del tracker  # the process "dies" without close(): only the spool remains
    assert len(spool.read_text().splitlines()) == 7
    assert replay_spool(sqlite_uri, spool, experiment) == 0
    (run,) = MlflowClient(sqlite_uri).search_runs([MlflowClient(sqlite_uri).get_experiment_by_name(experiment)
                                                   .experiment_id])
    assert [s for s, _ in _history(sqlite_uri, run.info.run_id, "loss")] == [0, 1, 2, 3, 4]
    assert run.info.status == "FINISHED" and not spool.exists()


def test_rejected_operation_is_logged_not_raised_nor_buffered(sqlite_uri, experiment, tmp_path, caplog):
    tracker = Tracker(sqlite_uri, experiment, spool_path=tmp_path / "s.jsonl")
    with tracker.start_run("pipeline") as run:
        tracker.log_params({"lr": 1})
        tracker.log_params({"lr": 2})  # MLflow refuses to change a logged param
        tracker.log_metric("after", 1.0)
    assert tracker.pending == 0 and "rejected log_params" in caplog.text
    assert MlflowClient(sqlite_uri).get_run(run.run_id).data.metrics == {"after": 1.0}


def test_attach_run_created_by_another_process(sqlite_uri, experiment, tmp_path):
    client = MlflowClient(sqlite_uri)
    run_id = client.create_run(client.create_experiment(experiment)).info.run_id
    tracker = Tracker(sqlite_uri, experiment, spool_path=tmp_path / "s.jsonl")
    handle = tracker.attach_run(run_id, name="train")
    tracker.log_metric("loss", 0.5, step=1, run=handle)
    with tracker.use_run(handle):
        tracker.set_tags({"stage": "sampled"})
    assert tracker.close() == 0
    run = client.get_run(run_id)
    assert run.data.metrics == {"loss": 0.5} and run.data.tags["stage"] == "sampled"
    assert run.info.status == "RUNNING"  # attached runs are left for their owner to end


def test_logging_without_open_run_is_a_clear_error(sqlite_uri, experiment, tmp_path):
    tracker = Tracker(sqlite_uri, experiment, spool_path=tmp_path / "s.jsonl")
    with pytest.raises(RuntimeError, match="no run is open"):
        tracker.log_metric("x", 1.0)
    with pytest.raises(RuntimeError, match="no parent run"):
        with tracker.child_run("dog", "customcrafter"):
            pass


@pytest.mark.integration
def test_real_server_killed_mid_run_then_restarted_loses_no_metric(tmp_path, monkeypatch):
    server = MlflowServer(tmp_path / "server").start()
    try:
        tracker = Tracker(server.url, "resilience", spool_path=tmp_path / "spool.jsonl", max_retries=1,
                          backoff_s=0.05, reconnect_interval_s=0.5, close_timeout_s=30)
        with tracker.start_run("pipeline") as parent, tracker.child_run("dog", "customcrafter") as child:
            tracker.log_params(_Train())
            for step in range(10):
                tracker.log_metric("loss", float(step), step=step)
            assert tracker.pending == 0

            server.stop()
            started = time.monotonic()
            for step in range(10, 40):
                tracker.log_metric("loss", float(step), step=step)
            assert time.monotonic() - started < 10, "a dead server must not hang training"
            assert not tracker.online and tracker.pending >= 30

            server.start()
            assert tracker.flush(timeout_s=30) == 0
            for step in range(40, 45):
                tracker.log_metric("loss", float(step), step=step)
        assert tracker.close() == 0
        client = MlflowClient(server.url)
        assert [s for s, _ in _history(server.url, child.run_id, "loss")] == list(range(45))
        run = client.get_run(child.run_id)
        assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.info.status == "FINISHED"
        assert run.data.params["optim.lr"] == "0.0001"
    finally:
        server.stop()



def _offline_run_then_flush_until_log_batch(tracker, monkeypatch, on_log_batch):
    """A run started and ended while the server was down (everything buffered); then the server comes back for
    ``create_run`` and the next operation, ``log_batch``, does ``on_log_batch``."""
    real_create = tracker.client.create_run
    monkeypatch.setattr(tracker.client, "create_run", lambda *a, **k: (_ for _ in ()).throw(_DOWN))
    with tracker.start_run("pipeline"):
        tracker.log_params({"steps": 5})
        for step in range(3):
            tracker.log_metric("loss", step * 0.1, step=step)
    monkeypatch.setattr(tracker.client, "create_run", real_create)
    monkeypatch.setattr(tracker.client, "log_batch", on_log_batch)
    tracker.flush()


def _only_run(uri: str, experiment: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def test_a_spool_left_after_a_partial_flush_reaches_the_run_that_flush_created(sqlite_uri, experiment, tmp_path,
                                                                                 monkeypatch):
    """The run was created, then the server went away again and the process died: the spool's remaining lines
    must carry the new run's id, or a replay drops them and leaves the run RUNNING and empty."""
    spool = tmp_path / "partial.jsonl"
    tracker = Tracker(sqlite_uri, experiment, spool_path=spool, max_retries=0, reconnect_interval_s=3600)
    _offline_run_then_flush_until_log_batch(tracker, monkeypatch, lambda *a, **k: (_ for _ in ()).throw(_DOWN))
    del tracker  # dies with the rest in the spool
    assert replay_spool(sqlite_uri, spool, experiment) == 0
    run = _only_run(sqlite_uri, experiment)
    assert run.data.params == {"steps": "5"} and run.info.status == "FINISHED"
    assert [s for s, _ in _history(sqlite_uri, run.info.run_id, "loss")] == [0, 1, 2]


def test_a_process_killed_right_after_creating_a_run_does_not_create_it_twice(sqlite_uri, experiment, tmp_path):
    """Killed (OOM, eviction: no cleanup) during a flush, just after the server created the buffered run: the
    replay must log into that run, not create a second one that stays RUNNING."""
    import os
    import subprocess
    import sys
    import textwrap

    spool = tmp_path / "killed.jsonl"
    script = textwrap.dedent(f"""
        import os, pytest
        sys_path = {str(Path(__file__).parent)!r}
        import sys; sys.path.insert(0, sys_path)
        from test_tracking import Tracker, _offline_run_then_flush_until_log_batch
        monkeypatch = pytest.MonkeyPatch()
        tracker = Tracker({sqlite_uri!r}, {experiment!r}, spool_path={str(spool)!r}, max_retries=0,
                          reconnect_interval_s=3600)
        _offline_run_then_flush_until_log_batch(tracker, monkeypatch, lambda *a, **k: os._exit(9))
    """)
    killed = subprocess.run([sys.executable, "-c", script], env=os.environ, capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert replay_spool(sqlite_uri, spool, experiment) == 0
    run = _only_run(sqlite_uri, experiment)
    assert run.data.params == {"steps": "5"} and run.info.status == "FINISHED"


def test_logs_never_show_the_password_of_the_tracking_uri(tmp_path, caplog):
    """A tracking URI with credentials (https://user:secret@host) is masked in what the tracker logs: the outage
    warnings (MLflow's own message quotes the URL) and a rejection, even when its message is cut short."""
    uri = "http://alice:s3cretPW@127.0.0.1:9"  # nothing listens: an outage at once
    tracker = Tracker(uri, "exp", spool_path=tmp_path / "s.jsonl", max_retries=0, backoff_s=0, http_timeout_s=1,
                      close_timeout_s=0.2)
    with caplog.at_level("INFO", logger="customcrafter.orchestration.tracking"):
        with tracker.start_run("pipeline"):
            tracker.log_metric("loss", 1.0)
        assert tracker.close() > 0
        cut = f"{'x' * 282}http://alice:s3cretPW@127.0.0.1:9/api"  # the 300-character cut falls in the password
        tracker._reject({"op": "log_batch", "key": "k"}, MlflowException(cut, INVALID_PARAMETER_VALUE))
    assert "unreachable" in caplog.text and "rejected log_batch" in caplog.text
    assert "http://alice:***@127.0.0.1:9" in caplog.text
    assert "s3cr" not in caplog.text
