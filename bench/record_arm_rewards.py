"""Record per-round rewards of every fixed arm on a real distillation run, for
the `replay` environment of `optima bandit` (`optima/bandit.py`).

Runs `optima run CONFIG -b "distillation.policy = @fixed_policy" -b
"fixed_policy.arm = k"` for every arm k and seed, and writes each run's
per-round rewards (`metrics.json`, `stages.student.rewards`) with the command,
machine and time to a JSON file. A fixed arm's curve is what that arm earns
when it is played every round: a replay assumes the other arms' curves would
not have changed had another arm been played in between (see docs/policies.md).

    OPTIMA_CACHE=.cache OMP_NUM_THREADS=1 nice -n 5 python bench/record_arm_rewards.py --seeds 0 --jobs 3 \
        --out optima/bandit_data/quickstart_fixed_arms.json

The first arm of a seed runs alone (it trains and caches the seed's teacher),
the others `--jobs` at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="gin/quickstart.gin")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", type=int, nargs="+", default=None, help="arm indices (default: all)")
    parser.add_argument("--out", default="optima/bandit_data/quickstart_fixed_arms.json")
    parser.add_argument("-b", "--binding", action="append", default=[], help="extra gin binding")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time once a seed's teacher is cached")
    args = parser.parse_args()
    optima = str(Path(sys.executable).with_name("optima"))
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {"runs": []}
    done = {(r["seed"], r["arm"]) for r in record["runs"]}
    start = time.time()
    lock = threading.Lock()
    command = ("OPTIMA_CACHE=.cache OMP_NUM_THREADS=1 nice -n 5 python bench/record_arm_rewards.py "
               f"--seeds {' '.join(map(str, args.seeds))} --jobs {args.jobs} --out {args.out}")

    def run(tmp: str, seed: int, arm: int) -> None:
        run_dir = os.path.join(tmp, f"seed{seed}-arm{arm}")
        bindings = [f"experiment.seed = {seed}", "distillation.policy = @fixed_policy",
                    f"fixed_policy.arm = {arm}", *args.binding]
        cmd = [optima, "run", args.config, "--run-dir", run_dir]
        for b in bindings:
            cmd += ["-b", b]
        t0 = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        summary = json.loads(Path(run_dir, "metrics.json").read_text())
        stage = summary["stages"]["student"]
        with lock:
            record["arms"] = stage["arms"]
            record["runs"].append({"seed": seed, "arm": arm, "label": stage["arms"][arm],
                                   "rewards": stage["rewards"], "test": summary["metrics"]["student"],
                                   "seconds": round(time.time() - t0, 1)})
            record["runs"].sort(key=lambda r: (r["seed"], r["arm"]))
            record.update({"config": args.config, "bindings": args.binding, "command": command,
                           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), "
                                      f"Python {platform.python_version()}"})
            record["seconds"] = round(time.time() - start, 1)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(record, indent=1) + "\n")
            print(f"seed {seed} arm {stage['arms'][arm]}: {time.time() - t0:.0f} s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            arms = [a for a in (args.arms if args.arms is not None else range(7)) if (seed, a) not in done]
            if not arms:
                continue
            run(tmp, seed, arms[0])  # trains and caches the seed's teacher
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(lambda a: run(tmp, seed, a), arms[1:]))
    print(f"wrote {out} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
