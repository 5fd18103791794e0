"""Training progress on the runner's console while a notebook trains: one line per interval, from ``log.jsonl``.

The kernel's own progress bar goes to the run's ``stderr.log`` (and is kept out of the report), so a user running a
250k-step stage 1 through ``python -m blip2lib.workbook run`` would otherwise see nothing for days. The runner
watches the run folder instead: every ``interval_s`` the newest ``log.jsonl`` under it (stage 2 trains one folder per
LLM family) is read from its end, and a line with the step, the loss, the throughput and the time left is logged —
plain lines, so it reads the same in a terminal, a ``nohup`` log or a SLURM output file.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("blip2lib.workbook.runner")

_TAIL_BYTES = 1 << 16  # a step row is < 1 KB: the last 64 KB always hold the last complete one


def last_step(path: Path) -> dict | None:
    """The last complete training row (one with a ``loss``) of a ``log.jsonl``, read from the file's end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            row = json.loads(line)
        except ValueError:  # a torn last line (being written) or the cut first one
            continue
        if isinstance(row, dict) and "loss" in row and "step" in row:
            return row
    return None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


class TrainingProgress:
    """Log a progress line per interval while ``run_dir`` trains; a context manager around the notebook's execution.

    Args:
        run_id: the run's name in the lines (``10_stage1_pretrain/paper_vitg``).
        run_dir: the run folder; every ``log.jsonl`` below it is watched.
        total_steps: the run's ``steps`` (None: no percentage or ETA).
        interval_s: seconds between lines; 0 turns the watcher off.
        emit: where a line goes (default: the runner's logger at INFO).
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, run_id: str, run_dir: Path, total_steps: int | None, interval_s: float = 30.0,
                 emit: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.run_id, self.run_dir, self.total = run_id, Path(run_dir), total_steps
        self.interval_s, self.emit, self.clock = interval_s, emit or log.info, clock
        self._last: dict[Path, tuple[int, float]] = {}  # log → (step, time) of the previous line
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> str | None:
        """One look at the newest ``log.jsonl``: the line logged, or None when no new step was written."""
        logs = [p for p in self.run_dir.rglob("log.jsonl") if p.is_file()] if self.run_dir.is_dir() else []
        if not logs:
            return None
        path = max(logs, key=lambda p: p.stat().st_mtime)
        row = last_step(path)
        if row is None:
            return None
        step, now = int(row["step"]), self.clock()
        prev = self._last.get(path)
        if prev is not None and prev[0] == step:
            return None
        self._last[path] = (step, now)
        where = path.parent.relative_to(self.run_dir).as_posix()
        name = self.run_id if where == "." else f"{self.run_id} {where}"
        text = f"[train] {name}: step {step:,}"
        if self.total:
            text += f"/{self.total:,} ({100 * step / self.total:.1f} %)"
        text += f", loss {float(row['loss']):.4g}"
        if row.get("samples_per_s"):
            text += f", {float(row['samples_per_s']):.1f} samples/s"
        if prev is not None and now > prev[1] and step > prev[0]:
            rate = (step - prev[0]) / (now - prev[1])  # steps per second over the last interval
            text += f", {rate:.2f} steps/s"
            if self.total and step < self.total:
                text += f", about {_duration((self.total - step) / rate)} left"
        self.emit(text)
        return text

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as e:  # never let the watcher disturb the run it reports on
                log.debug("progress watcher: %s", e)

    def __enter__(self) -> TrainingProgress:
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._watch, name=f"progress {self.run_id}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            try:  # the last step the run wrote: a short run still gets its one line, a long one its final state
                self.poll()
            except Exception as e:
                log.debug("progress watcher: %s", e)
