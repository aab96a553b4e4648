"""Torch threads 1 vs 2 on the quickstart's first stage, timed in one run: the
measurement behind `experiment.threads`' default (`optima run --threads`).

Runs the quickstart's LARGE pretraining stage (`gin/quickstart.gin`: its model,
corpus, batch, optimizer and DataLoader worker, as `optima run` does) in blocks
of STEPS steps, alternating 1 and 2 torch threads (1, 2, 1, 2, ...), and times
each block's steps after its first WARMUP (model building, the corpus and the
loader's start are not timed), for at most BUDGET seconds. Alternating blocks share the machine's load, so
the ratio is fair even on a busy machine; the load (`uptime`) is recorded
before and after. BESIDE=N starts N CPU-bound processes (one-thread torch
matmuls, as another training job) for the whole run and stops them after: a
busy machine on purpose. Writes bench/results/thread_count.json (OUT=...).

    OMP_NUM_THREADS=1 python bench/thread_count.py            # 4 blocks of <= 50 steps, 1-3 min
    OMP_NUM_THREADS=1 BESIDE=2 OUT=bench/results/thread_count_beside2.json python bench/thread_count.py
    BLOCKS=2 STEPS=30 python bench/thread_count.py
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gin
import torch

from optima import config as cfg
from optima.data import default_workers
from optima.experiment import pretraining
from optima.model_card import cpu_name
from optima.reporting import Reporter

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "gin" / "quickstart.gin"
STAGE = "large"
STEPS = int(os.environ.get("STEPS", 50))
WARMUP = int(os.environ.get("WARMUP", 5))
BLOCKS = int(os.environ.get("BLOCKS", 4))
BESIDE = int(os.environ.get("BESIDE", 0))
BUDGET = float(os.environ.get("BUDGET", 30))  # seconds a block times at most (a busy machine's 2 threads crawl)
OUT = Path(os.environ.get("OUT", ROOT / "bench" / "results" / "thread_count.json"))


class Enough(Exception):
    """A block's time is up."""


class StepClock(Reporter):
    """Each step's end; stops the stage once BUDGET seconds have passed after WARMUP."""

    def __init__(self):
        self.times: dict[int, float] = {}

    def on_step(self, stage, step, losses, lr):
        self.times[step] = time.perf_counter()
        if step > WARMUP and self.times[step] - self.times[WARMUP] > BUDGET:
            raise Enough


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def block(threads: int, cache: Path) -> float:
    """Seconds per step of one block at `threads` torch threads, and the steps timed."""
    torch.set_num_threads(threads)
    factory = gin.get_bindings("experiment")["pretraining"][STAGE]
    clock = StepClock()
    with tempfile.TemporaryDirectory(dir=cache) as tmp, gin.config_scope(STAGE):
        try:
            pretraining(STAGE, factory, torch.device("cpu"), clock, Path(tmp), None, default_workers(), steps=STEPS)
        except Enough:
            pass
    last = max(clock.times)
    return (clock.times[last] - clock.times[WARMUP]) / (last - WARMUP), last - WARMUP


BUSY_LOOP = "import torch; torch.set_num_threads(1); a = torch.randn(256, 256)\nwhile True: a = torch.tanh(a @ a)"


def main() -> None:
    cfg.setup(False)
    cfg.parse([str(CONFIG)], [])
    beside = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(BESIDE)]
    try:
        time.sleep(5 if beside else 0)  # let them start before the first block
        load_before = uptime()
        order = [1 + k % 2 for k in range(BLOCKS)]
        blocks: list[dict] = []
        with tempfile.TemporaryDirectory() as cache:
            for threads in order:
                seconds, steps = block(threads, Path(cache))
                blocks.append({"threads": threads, "steps_timed": steps, "ms_per_step": round(seconds * 1000, 1),
                               "uptime": uptime()})
                print(f"{threads} thread(s): {seconds * 1000:.1f} ms/step over {steps} steps", flush=True)
                write(blocks, order, load_before)  # after every block: a long block loses nothing before it
    finally:
        for process in beside:
            process.kill()
            process.wait()


def write(blocks: list[dict], order: list[int], load_before: str) -> None:
    ms = {t: statistics.median(b["ms_per_step"] for b in blocks if b["threads"] == t)
          for t in (1, 2) if any(b["threads"] == t for b in blocks)}
    result = {
        "command": f"OMP_NUM_THREADS=1 STEPS={STEPS} WARMUP={WARMUP} BLOCKS={BLOCKS} BUDGET={BUDGET:g} "
                   f"BESIDE={BESIDE} {'nice -n %d ' % os.nice(0) if os.nice(0) else ''}python bench/thread_count.py",
        "beside": f"{BESIDE} CPU-bound process(es) started by the bench (one-thread torch matmul loops)",
        "what": f"{CONFIG.relative_to(ROOT)}: the {STAGE!r} pretraining stage, up to {STEPS} steps per block "
                f"(the first {WARMUP} untimed, then at most {BUDGET:g} s), blocks alternating torch threads {order}, "
                f"{default_workers()} DataLoader worker(s)",
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "uptime_before": load_before,
        "blocks": blocks,
        "median_ms_per_step": {str(t): v for t, v in ms.items()},
        "ratio_2_over_1": round(ms[2] / ms[1], 2) if len(ms) == 2 else None,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
