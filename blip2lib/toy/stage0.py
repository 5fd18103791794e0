"""Worker of the toy-world build: ``python -m blip2lib.toy.stage0 OUT SEED SIZE STATUS_JSON JOB [JOB ...]``.

Trains the named frozen stage-0 models (``vit``, ``opt``, ``t5``, ``bert``) one after the other on ONE thread and
saves them under ``OUT``; ``STATUS_JSON`` holds ``{"steps": n, "seconds": {job: s}}``, rewritten atomically every
few steps so the parent's progress bar can follow. Started by :func:`blip2lib.toy.build._run_jobs`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from .build import train_stage0


def main(argv: list[str]) -> None:
    """Train ``JOB``s in order; see the module docstring for ``argv``."""
    out, seed, size, status_path, *jobs = argv
    torch.set_num_threads(1)  # weights independent of the machine; two workers share 2 cores
    status = {"steps": 0, "seconds": {}}
    status_file = Path(status_path)

    def write() -> None:
        tmp = status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(status))
        os.replace(tmp, status_file)

    def tick() -> None:
        status["steps"] += 1
        if status["steps"] % 10 == 0:
            write()

    for job in jobs:
        t = time.perf_counter()
        train_stage0(job, Path(out), int(seed), size, tick)
        status["seconds"][job] = round(time.perf_counter() - t, 1)
    write()


if __name__ == "__main__":
    main(sys.argv[1:])
