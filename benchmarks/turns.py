"""Two benchmark processes on one GPU, timed in alternating rounds: A B B A A B B A ...

Session 20 (``RESULTS.md``) timed two compiled variants side by side in two blocks, one process timing while the
other waited, then the other. In both orders the process timed first took ~69.3 ms per CUDA-graphed CFG forward and
the one timed second ~66.0 ms, whatever code each ran: the block order mattered more than the change. Alternating
rounds while both processes are alive times both under the same conditions, and the A B B A order cancels a drift
over time. Pure Python (files in a shared directory), so it is tested on the CPU.

    turns = Alternation(directory, index)   # index 0 in one process, 1 in the other
    turns.ready()                           # after warming up; waits for the other (or goes on alone)
    for round_ in range(rounds):
        with turns.turn(round_):
            ...time one round...
    turns.done()                            # also on errors: the other then stops waiting for turns
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path


class Alternation:
    """Turn-taking between the processes ``0`` and ``1`` through marker files in ``directory``. A process that
    waits longer than ``timeout`` seconds for the other, or finds the other done, goes on alone."""

    def __init__(self, directory: str | Path, index: int, timeout: float = 900.0, poll: float = 0.02):
        if index not in (0, 1):
            raise ValueError(f"index must be 0 or 1, not {index}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.index, self.other, self.timeout, self.poll = index, 1 - index, timeout, poll
        self.alone = False

    @staticmethod
    def slot(round_: int, index: int) -> int:
        """The turn (0, 1, 2, ...) in which process ``index`` times round ``round_``: A B, then B A, and so on."""
        return 2 * round_ + (index ^ (round_ % 2))

    def _marker(self, name: str) -> Path:
        return self.directory / name

    def _wait(self, path: Path) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.alone and not path.exists():
            if self._marker(f"done.{self.other}").exists() or time.monotonic() > deadline:
                self.alone = True
                return
            time.sleep(self.poll)

    def ready(self) -> None:
        self._marker(f"ready.{self.index}").touch()
        self._wait(self._marker(f"ready.{self.other}"))

    @contextlib.contextmanager
    def turn(self, round_: int):
        turn = self.slot(round_, self.index)
        if turn:
            self._wait(self._marker(f"turn.{turn}"))
        try:
            yield
        finally:
            self._marker(f"turn.{turn + 1}").touch()

    def done(self) -> None:
        self._marker(f"done.{self.index}").touch()
