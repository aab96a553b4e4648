"""Sizing measurements of a synthetic config (gin/synthetic/README.md): runs
`optima run` for each variant and seed and prints what the sizing is judged by:

- the teacher against a student trained on the task alone from the same
  initialisation (`task_only`: every distillation weight 0);
- each fixed arm's student metric, mean and sd over seeds (do arms differ by
  more than the seed sd?);
- per fixed arm, the per-round reward: mean, sd over rounds, and the
  round-to-round noise sd (sd of successive differences / sqrt 2, which a slow
  trend does not inflate), against the gaps between the arms' mean rewards;
- steps per round T against reward noise, without a run per T: a fixed arm's
  training does not depend on T, so its logged per-step whole-model losses
  (TensorBoard `loss/total/<term>`) are summed into rounds of each T in
  `--round-lengths` and turned into the combined reward as the engine does;
  for each T, the mean over arms of the noise sd against the spread of the arms'
  mean rewards;
- CPU seconds per run (the child's user + system time: on an idle machine with
  one torch thread that is its wall time; the shared machine's wall time is
  noise).

    python bench/synthetic_sizing.py gin/synthetic/ve_tiny6.gin --variants task_only arms --seeds 0 1 2 \
        --jobs 2 --out runs/sizing/ve_tiny6 [-b BINDING]...

Runs are skipped when their metrics.json exists, so a rerun adds what is missing.
Every run uses one torch thread (OMP_NUM_THREADS=1).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ARMS = ("image", "text", "multimodal", "image+text", "image+multimodal", "text+multimodal", "image+text+multimodal")
LAYERWISE = "distillation.policy = @layerwise_policy"
VARIANTS = {
    "task_only": [LAYERWISE, "optima_loss.kd_weight = 0.0", "optima_loss.hidden_weight = 0.0",
                  "optima_loss.attn_weight = 0.0"],
    "kd_only": [LAYERWISE, "optima_loss.hidden_weight = 0.0", "optima_loss.attn_weight = 0.0"],
    "layerwise": [LAYERWISE],
    "random": ["distillation.policy = @random_policy"],
    "optima": [],
    **{f"arm:{label}": ["distillation.policy = @fixed_policy", f"fixed_policy.arm = {k}"]
       for k, label in enumerate(ARMS)},
}
GROUPS = {"arms": [f"arm:{a}" for a in ARMS], "baselines": ["task_only", "kd_only", "layerwise", "random", "optima"]}


def run_one(config: str, variant: str, seed: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / variant.replace(":", "_").replace("+", "-") / f"seed{seed}"
    metrics = run_dir / "metrics.json"
    record = run_dir.parent / f"seed{seed}.timing.json"
    if not metrics.exists():
        if run_dir.exists():  # an interrupted attempt: start it again
            import shutil

            shutil.rmtree(run_dir)
        args = [sys.executable, "-m", "optima.cli.main", "run", config, "--run-dir", str(run_dir),
                "-b", f"experiment.seed = {seed}"]
        for b in extra + VARIANTS[variant]:  # the variant's bindings win (task_only's zero weights)
            args += ["-b", b]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        start = time.time()
        with open(out / f"{run_dir.parent.name}-seed{seed}.log", "w") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
        if status != 0 or not metrics.exists():
            return {"variant": variant, "seed": seed, "error": f"exit status {status}, see {log.name}"}
        record.write_text(json.dumps({"wall_s": time.time() - start, "cpu_s": usage.ru_utime + usage.ru_stime}))
    summary = json.loads(metrics.read_text())
    timing = json.loads(record.read_text()) if record.exists() else {}
    student = [k for k in summary["metrics"] if k != "teacher"][-1]
    stage = summary["stages"][student]
    return {"variant": variant, "seed": seed, "run_dir": str(run_dir), "student": student,
            "metric": summary["metrics"][student],
            "teacher": summary["metrics"]["teacher"], "rewards": stage.get("rewards", []),
            "plays": stage.get("plays", []), **timing}


def step_losses(run_dir: Path) -> dict[str, list[float]]:
    """The student stage's logged whole-model loss per step, by term."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stage = [d for d in (run_dir / "tensorboard").iterdir() if d.name not in ("teacher", "summary", "large", "base")]
    events = EventAccumulator(str(stage[0]), size_guidance={"scalars": 0})
    events.Reload()
    return {t: [e.value for e in events.Scalars(f"loss/total/{t}")] for t in ("kd", "hidden", "attn")}


def rewards_for(losses: dict[str, list[float]], T: int) -> list[float]:
    """The combined reward of each round after the first, rounds of T steps."""
    from optima.plugins.rewards.loss_decrement import combined_reward

    reward = combined_reward()
    n = min(len(v) for v in losses.values()) // T
    rounds = [{t: sum(v[r * T:(r + 1) * T]) for t, v in losses.items()} for r in range(n)]
    return [reward(a, b) for a, b in zip(rounds, rounds[1:])]


def _noise(series: list[list[float]]) -> float:
    diffs = [b - a for xs in series for a, b in zip(xs, xs[1:])]
    return statistics.stdev(diffs) / math.sqrt(2) if len(diffs) > 1 else float("nan")


def round_length_study(out: Path, results: list[dict], lengths: list[int]) -> dict:
    arms = [r for r in results if "error" not in r and r["variant"].startswith("arm:")]
    if not arms:
        return {}
    logs = {(r["variant"], r["seed"]): step_losses(Path(r["run_dir"])) for r in arms}
    print("\nsteps per round T vs reward noise (fixed arms' logged step losses re-cut into rounds):")
    print(f"{'T':>4s} {'rounds':>6s} {'spread of arm means':>20s} {'mean noise sd':>14s} {'noise/spread':>13s}")
    study = {}
    for T in lengths:
        per_arm = {}
        for variant in dict.fromkeys(v for v, _ in logs):
            series = [rewards_for(loss, T) for (v, _), loss in logs.items() if v == variant]
            flat = [x for xs in series for x in xs]
            per_arm[variant] = {"mean": statistics.mean(flat) if flat else float("nan"), "noise_sd": _noise(series)}
        means = [a["mean"] for a in per_arm.values()]
        spread = max(means) - min(means)
        noise = statistics.mean(a["noise_sd"] for a in per_arm.values())
        rounds = min(len(v) for v in next(iter(logs.values())).values()) // T
        study[T] = {"rounds": rounds, "spread": spread, "noise_sd": noise, "arms": per_arm}
        print(f"{T:4d} {rounds:6d} {spread:20.4f} {noise:14.4f} {noise / spread if spread else float('inf'):13.2f}")
    return study


def _stats(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan"), 0
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else float("nan"), len(xs)


def report(results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    for r in results:
        if "error" in r:
            print(f"FAILED {r['variant']} seed {r['seed']}: {r['error']}")
    if not ok:
        return {}
    key = next(iter(ok[0]["metric"]))  # accuracy or cider
    out: dict = {"metric": key, "variants": {}, "rewards": {}}
    teachers = {r["seed"]: r["teacher"][key] for r in ok}
    m, s, n = _stats(list(teachers.values()))
    out["teacher"] = {"mean": m, "sd": s, "n": n}
    print(f"{'variant':28s} {key:>9s} {'sd':>7s} {'n':>3s}   cpu s/run")
    print(f"{'teacher':28s} {m:9.4f} {s:7.4f} {n:3d}")
    for variant in dict.fromkeys(r["variant"] for r in ok):
        rows = [r for r in ok if r["variant"] == variant]
        m, s, n = _stats([r["metric"][key] for r in rows])
        cpu = statistics.mean([r["cpu_s"] for r in rows if "cpu_s" in r] or [float("nan")])
        out["variants"][variant] = {"mean": m, "sd": s, "n": n, "cpu_s": cpu,
                                    "values": {r["seed"]: r["metric"][key] for r in rows}}
        print(f"{variant:28s} {m:9.4f} {s:7.4f} {n:3d}   {cpu:6.1f}")
    arms = [v for v in out["variants"] if v.startswith("arm:")]
    if arms:
        print("\nfixed arms, per-round reward (rounds 2.., pooled over seeds): mean, sd over rounds, "
              "round-to-round noise sd")
        for variant in arms:
            rows = [r for r in ok if r["variant"] == variant]
            rewards = [x for r in rows for x in r["rewards"][1:] if x is not None]
            diffs = [b - a for r in rows for a, b in zip(r["rewards"][1:], r["rewards"][2:])
                     if a is not None and b is not None]
            mean, sd, n = _stats(rewards)
            noise = statistics.stdev(diffs) / math.sqrt(2) if len(diffs) > 1 else float("nan")
            out["rewards"][variant] = {"mean": mean, "sd": sd, "noise_sd": noise, "rounds": n}
            print(f"{variant:28s} mean {mean:.4f}  sd {sd:.4f}  noise sd {noise:.4f}  (n {n})")
        means = sorted(v["mean"] for v in out["rewards"].values())
        gaps = [b - a for a, b in zip(means, means[1:])]
        spread = means[-1] - means[0]
        noise = statistics.mean(v["noise_sd"] for v in out["rewards"].values())
        out["reward_gaps"] = {"spread": spread, "median_gap": statistics.median(gaps), "mean_noise_sd": noise}
        print(f"arm mean rewards: spread {spread:.4f}, median gap between neighbours {statistics.median(gaps):.4f}, "
              f"mean noise sd {noise:.4f} (noise/spread {noise / spread if spread else float('inf'):.2f})")
        seed_sd = statistics.mean(out["variants"][v]["sd"] for v in arms if not math.isnan(out["variants"][v]["sd"]))
        arm_means = sorted(out["variants"][v]["mean"] for v in arms)
        out["arm_metric"] = {"spread": arm_means[-1] - arm_means[0], "mean_seed_sd": seed_sd}
        print(f"fixed arms' {key}: spread {arm_means[-1] - arm_means[0]:.4f} vs mean seed sd {seed_sd:.4f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--variants", nargs="+", default=["task_only", "arms"],
                   help=f"names of {list(VARIANTS)} or groups {list(GROUPS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("-b", dest="bindings", action="append", default=[])
    p.add_argument("--round-lengths", nargs="+", type=int, default=[5, 10, 20, 40])
    a = p.parse_args()
    variants = [v for name in a.variants for v in GROUPS.get(name, [name])]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # Stages are cached, not locked: the first run alone (it pretrains), then one run
    # per other seed (each trains its seed's teacher), then the rest.
    phases = [[(variants[0], a.seeds[0])], [(variants[0], s) for s in a.seeds[1:]],
              [(v, s) for s in a.seeds for v in variants[1:]]]
    results = []
    with ThreadPoolExecutor(a.jobs) as pool:
        for phase in phases:
            results += list(pool.map(lambda j: run_one(a.config, *j, out, a.bindings), phase))
    summary = report(results)
    summary["round_lengths"] = round_length_study(out, results, a.round_lengths)
    (out / "sizing.json").write_text(json.dumps({"config": a.config, "bindings": a.bindings, "summary": summary,
                                                 "runs": results}, indent=1))


if __name__ == "__main__":
    main()
