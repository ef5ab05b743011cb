"""The benchmarks' turn-taking (``benchmarks/turns.py``): two processes on one GPU time their rounds alternately,
A B B A A B B A, and neither waits for a partner that is gone."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# one process: warms up for `delay` seconds, then times `rounds` rounds, appending "<index> <round> start/end" lines
WORKER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {benchmarks!r})
    from turns import Alternation
    directory, index, rounds, delay, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    turns = Alternation(directory, index, timeout=float(sys.argv[6]))
    try:
        time.sleep(delay)
        turns.ready()
        for round_ in range(rounds):
            with turns.turn(round_):
                with open(log, "a") as handle:
                    handle.write(f"{{index}} {{round_}} start\\n")
                time.sleep(0.05)
                with open(log, "a") as handle:
                    handle.write(f"{{index}} {{round_}} end\\n")
    finally:
        turns.done()
""")


def _start(tmp_path: Path, index: int, rounds: int, delay: float, timeout: float = 60.0) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(benchmarks=str(BENCHMARKS)))
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "turns"), str(index), str(rounds),
                             str(delay), str(tmp_path / "log"), str(timeout)])


def _events(tmp_path: Path) -> list[tuple[int, int, str]]:
    return [(int(i), int(r), what) for i, r, what in (line.split() for line in (tmp_path / "log").read_text().split("\n")
                                                        if line)]


def test_two_processes_time_their_rounds_alternately_without_overlap(tmp_path):
    # the process with index 1 warms up longer: process 0 must still wait for it before its first round
    procs = [_start(tmp_path, 0, 4, 0.0), _start(tmp_path, 1, 4, 0.5)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    events = _events(tmp_path)
    starts = [(i, r) for i, r, what in events if what == "start"]
    assert starts == [(0, 0), (1, 0), (1, 1), (0, 1), (0, 2), (1, 2), (1, 3), (0, 3)]  # A B B A A B B A
    # never two rounds at once: every start is followed by its own end
    assert all(events[k][:2] == events[k + 1][:2] and events[k + 1][2] == "end" for k in range(0, len(events), 2))


def test_a_process_goes_on_alone_when_its_partner_is_done_or_never_comes(tmp_path):
    # the partner times 1 round of 3 and exits: the other's remaining rounds do not wait for turns that never come
    procs = [_start(tmp_path, 0, 3, 0.0), _start(tmp_path, 1, 1, 0.0)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert sorted((i, r) for i, r, what in _events(tmp_path) if what == "start") == [(0, 0), (0, 1), (0, 2), (1, 0)]
    # no partner at all: ready() gives up after the timeout and the rounds run alone
    alone = tmp_path / "alone"
    alone.mkdir()
    began = time.monotonic()
    assert _start(alone, 1, 2, 0.0, timeout=1.0).wait(timeout=60) == 0
    assert [(i, r) for i, r, what in _events(alone) if what == "start"] == [(1, 0), (1, 1)]
    assert time.monotonic() - began < 30


def test_slots_and_indices():
    sys.path.insert(0, str(BENCHMARKS))
    from turns import Alternation

    assert [Alternation.slot(r, 0) for r in range(4)] == [0, 3, 4, 7]
    assert [Alternation.slot(r, 1) for r in range(4)] == [1, 2, 5, 6]
    with pytest.raises(ValueError, match="index must be 0 or 1"):
        Alternation("unused", 2)
