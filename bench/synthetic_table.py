"""The evidence table (issue 9) in one command: the paper's comparison on every
synthetic task x student, and VE/Tiny6 with three passes of distillation (where
the arms matter) with OPTIMA's sensitivity and the policy comparison, with the
figures, into `results/synthetic/`.

    python bench/synthetic_table.py --jobs 2                  # everything (results/synthetic/README.md: time)
    python bench/synthetic_table.py --jobs 2 --only ve_tiny6  # one piece

Each piece is an `optima sweep` of a `gin/synthetic` config with a variants file
of `gin/sweeps/` into `--sweeps DIR/<piece>` (resumable: a rerun skips finished
runs, so an interrupted table continues where it stopped), then
`optima report` for its figures. What is kept in `results/synthetic/<piece>/`:
`results.md` and `results.csv` (run directories relative to the sweep), the
figures (Figure 3 and the paired differences of every student metric, Figures
5 and 6 of every variant with a policy), `meta.json` (command, machine,
load, wall time) and, for pieces with fixed arms, `reward_noise.json`: each
fixed arm's per-round reward (mean, sd, round-to-round noise sd) and the same
rewards recomputed from the runs' logged per-step losses for other round
lengths T (a fixed arm's training does not depend on T). `README.md` there is
then rewritten from every piece's results.

    python bench/synthetic_table.py --report-only   # results.md, metric figures and README.md again
    python bench/synthetic_table.py --add PIECE SWEEP_DIR... --note "how they were made"  # more runs

`--report-only` runs nothing: from each kept piece's `results.csv` it writes
`results.md` and the metric figures (per variant, paired) again with the
current code (`optima.sweep.results_markdown`, `optima.figures.metric_figures`),
then README.md. The arm figures need the runs' round logs, which are not kept:
those of a piece stay as its sweep's report drew them.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "synthetic"
TASKS = ("ve", "vqa", "nlvr2", "captions")
# (piece, config, variants file), in the order they run: the most informative first.
PLAN = [
    ("ve_tiny6", "gin/synthetic/ve_tiny6.gin", "gin/sweeps/baselines.toml"),
    # 3 passes of distillation instead of 1: where the layer losses pay off and the arms differ
    ("ve_tiny6-long", "gin/synthetic/ve_tiny6_long.gin", "gin/sweeps/baselines.toml"),
    ("ve_tiny6-long-sensitivity", "gin/synthetic/ve_tiny6_long.gin", "gin/sweeps/sensitivity.toml"),
    ("ve_tiny6-long-policies", "gin/synthetic/ve_tiny6_long.gin", "gin/sweeps/policies.toml"),
    *[(f"{t}_tiny6", f"gin/synthetic/{t}_tiny6.gin", "gin/sweeps/baselines.toml") for t in TASKS[1:]],
    *[(f"{t}_tiny12", f"gin/synthetic/{t}_tiny12.gin", "gin/sweeps/baselines.toml") for t in TASKS],
    # Rewards that see the task, the empty arm, the normalised layer loss (docs/method.md),
    # with the baselines they are paired with, on the three pieces where the arms differ
    ("ve_tiny6-long-task-aware", "gin/synthetic/ve_tiny6_long.gin", "gin/sweeps/task_aware.toml"),
    ("captions_tiny6-task-aware", "gin/synthetic/captions_tiny6.gin", "gin/sweeps/task_aware.toml"),
    ("captions_tiny12-task-aware", "gin/synthetic/captions_tiny12.gin", "gin/sweeps/task_aware.toml"),
    # The reward ablation (KD-only, layerwise, combined rewards) where the arms differ
    ("ve_tiny6-long-rewards", "gin/synthetic/ve_tiny6_long.gin", "gin/sweeps/rewards.toml"),
    ("captions_tiny6-rewards", "gin/synthetic/captions_tiny6.gin", "gin/sweeps/rewards.toml"),
]
#: `--variant` options a piece adds to its variants file: the task-aware pieces' best
#: fixed arm (the best of the 7 in the piece's baselines table, 3 seeds), at 5 seeds.
EXTRA_VARIANTS = {
    "ve_tiny6-long-task-aware": ["fixed-image+multimodal=distillation.policy = @fixed_policy; fixed_policy.arm = 4"],
    "captions_tiny6-task-aware": ["fixed-image=distillation.policy = @fixed_policy; fixed_policy.arm = 0"],
    "captions_tiny12-task-aware": ["fixed-text=distillation.policy = @fixed_policy; fixed_policy.arm = 1"],
}
#: What the task-aware candidates are paired with, seed by seed.
REFERENCES = ("layerwise", "task-only", "fixed")
ROUND_LENGTHS = (5, 10, 20, 40)


def machine() -> dict:
    from optima.model_card import cpu_name

    return {"cpu": cpu_name(), "cores_available": len(os.sched_getaffinity(0)), "platform": platform.platform(),
            "python": platform.python_version()}


def run_piece(piece: str, config: str, variants: str, sweeps: Path, jobs: int) -> dict:
    sweep_dir = sweeps / piece
    extra = [a for v in EXTRA_VARIANTS.get(piece, []) for a in ("--variant", v)]
    cmd = [sys.executable, "-m", "optima.cli.main", "sweep", config, "--variants", variants, *extra,
           "--jobs", str(jobs), "--sweep-dir", str(sweep_dir)]
    load_before, start = os.getloadavg(), time.time()
    print(f"== {piece}: {' '.join(cmd[2:])}", flush=True)
    code = subprocess.call(cmd, cwd=ROOT)
    wall = time.time() - start
    subprocess.call([sys.executable, "-m", "optima.cli.main", "report", str(sweep_dir)], cwd=ROOT,
                    stdout=subprocess.DEVNULL)
    return {"piece": piece, "config": config, "variants": variants, "sweep_exit_code": code,
            "command": f"optima sweep {config} --variants {variants} "
                       + "".join(f"--variant '{v}' " for v in EXTRA_VARIANTS.get(piece, []))
                       + f"--jobs {jobs} --sweep-dir SWEEPS/{piece}",
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)), "wall_s": round(wall, 1),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()], "machine": machine(),
            "students_from_cache": students_from_cache(sweep_dir)}


def students_from_cache(sweep_dir: Path) -> str:
    """How many of the sweep's runs took their student from the stage cache (the
    same bindings distilled before: the wall time does not include them)."""
    runs = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/seed-*/metrics.json"))]
    reused = sum(all(stage.get("cached") for name, stage in run["stages"].items() if name in run["metrics"]
                     and name != "teacher") for run in runs)
    return f"{reused} of {len(runs)}"


def keep(piece: str, sweep_dir: Path, meta: dict, out: Path = OUT) -> None:
    """Copy what the piece's result is made of into `out/<piece>/`."""
    dest = out / piece
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "figures").mkdir(parents=True)
    text = (sweep_dir / "results.md").read_text().replace(str(sweep_dir), f"SWEEPS/{piece}")
    (dest / "results.md").write_text(text)
    with open(sweep_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["run_dir"] = os.path.relpath(row["run_dir"], sweep_dir) if row.get("run_dir") else ""
    if rows:
        with open(dest / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    for png in sorted((sweep_dir / "figures").glob("*.png")):
        # every metric's figures and every variant's arm figures
        shutil.copy2(png, dest / "figures" / png.name)
    noise = reward_noise(sweep_dir)
    if noise:
        (dest / "reward_noise.json").write_text(json.dumps(noise, indent=1) + "\n")
    (dest / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def sweep_rows(sweep_dir: Path, rename: dict[str, str]) -> list[dict]:
    """A sweep's results.csv rows, variants renamed by `rename` (a name in the
    sweep -> its name in the variants file), run directories relative to `SWEEPS`."""
    with open(sweep_dir / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["variant"] = rename.get(row["variant"], row["variant"])
        row["run_dir"] = os.path.relpath(row["run_dir"], sweep_dir.parent) if row.get("run_dir") else ""
    return rows


def copy_arm_figures(sweep_dir: Path, dest: Path) -> None:
    """A sweep's arm figures into a piece's figures/, named by sweep (the metric
    figures are `report_piece`'s)."""
    for png in sorted((sweep_dir / "figures").glob("*-arm-*.png")):
        shutil.copy2(png, dest / "figures" / f"{sweep_dir.name}-{png.name}")


def keep_gathered(piece: str, sweep_dirs: list[Path], meta: dict, out: Path = OUT) -> None:
    """Keep a piece made by several sweeps of its config, each with some of the
    piece's variants and seeds (the same bindings as its variants file): their
    results.csv rows together (run directories relative to `SWEEPS`) and the
    figures of each sweep (named by sweep); `report_piece` then writes results.md."""
    dest = out / piece
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "figures").mkdir(parents=True)
    rows, columns, seen = [], {}, set()
    rename = meta.pop("rename", {})
    for sweep_dir in sweep_dirs:
        for row in sweep_rows(sweep_dir, rename):
            if (row["variant"], row["seed"]) in seen:  # a run two sweeps share (the same cached stages)
                continue
            seen.add((row["variant"], row["seed"]))
            rows.append(row)
            columns.update(dict.fromkeys(row))
        copy_arm_figures(sweep_dir, dest)
    order = ["variant", "seed", "status"]
    tail = [c for c in ("wall_s", "run_dir", "error") if c in columns]
    rest = [c for c in columns if c not in order and c not in tail]
    metrics = [c for c in rest if c.count("/") == 1 and "." not in c]  # `<network>/<metric>`, after the bindings
    fields = order + [c for c in rest if c not in metrics] + metrics + tail
    with open(dest / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (dest / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def add_sweeps(piece: str, sweep_dirs: list[Path], note: str, rename: dict[str, str], out: Path = OUT) -> int:
    """Add the runs of more sweeps of a kept piece's config (variants of its
    variants file, under the file's names or renamed by `rename`) to the piece:
    their rows, arm figures and `note` on how they were made. A run the piece
    has already (same variant and seed) is skipped where its metrics are the
    same (the sweep took it from the stage cache) and an error where they are
    not: then nothing is written."""
    dest = out / piece
    for path in [dest / "results.csv", *(d / "results.csv" for d in sweep_dirs)]:
        if not path.is_file():
            raise SystemExit(f"{path}: not found; --add takes a kept piece and finished sweeps of its config")
    with open(dest / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = list(reader.fieldnames or []), list(reader)
    metrics = [c for c in fields if c.count("/") == 1 and "." not in c]
    have = {(r["variant"], r["seed"]): [r[m] for m in metrics] for r in rows}
    new = []
    for sweep_dir in sweep_dirs:
        for r in sweep_rows(sweep_dir, rename):
            key = (r["variant"], r["seed"])
            if key in have:
                if have[key] == [r.get(m, "") for m in metrics]:
                    continue
                raise SystemExit(f"{sweep_dir / 'results.csv'}: {r['variant']} seed {r['seed']} is in "
                                 f"{dest / 'results.csv'} already, with other metrics; add only new runs")
            have[key] = [r.get(m, "") for m in metrics]
            for c in r:
                if c not in fields:  # a key only the new runs bind: with the other bound keys
                    fields.insert(fields.index(metrics[0]), c)
            new.append(r)
    with open(dest / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows + new)
    for sweep_dir in sweep_dirs:
        copy_arm_figures(sweep_dir, dest)
    meta = json.loads((dest / "meta.json").read_text())
    meta["note"] = f"{meta['note']}; {note}" if meta.get("note") else note
    (dest / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return len(new)


# -- a piece's results again, from its results.csv ------------------------------------

def jobs_from_csv(path: Path) -> tuple[list, list]:
    """The `optima.sweep.Job`s and `Variant`s (grid order) a kept `results.csv` describes."""
    from optima.sweep import Job, Variant

    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = list(reader.fieldnames or []), list(reader)
    # variant, seed, status, the bound keys, the `<network>/<metric>` columns, wall_s, run_dir, error
    metrics = [c for c in columns if c.count("/") == 1 and "." not in c]
    bound = columns[3:columns.index(metrics[0]) if metrics else columns.index("wall_s")]
    jobs, grid = [], {}
    for r in rows:
        bindings = tuple(f"{k} = {r[k]}" for k in bound if r[k])
        job = Job(r["variant"], int(r["seed"]), bindings, bindings, Path(r["run_dir"]), Path(f"{r['run_dir']}.log"),
                  status=r["status"], metrics={m: float(r[m]) for m in metrics if r[m]},
                  wall_s=float(r["wall_s"] or 0.0), error=r["error"] or None)
        jobs.append(job)
        seeds = grid.setdefault(r["variant"], (bindings, []))[1]
        seeds.append(job.seed)
    return jobs, [Variant(name, b, tuple(seeds)) for name, (b, seeds) in grid.items()]


def report_piece(piece_dir: Path) -> list[Path]:
    """`results.md` and the metric figures of a kept piece, from its results.csv and meta.json."""
    from types import SimpleNamespace

    from optima import figures
    from optima.sweep import results_markdown

    jobs, grid = jobs_from_csv(piece_dir / "results.csv")
    config = json.loads((piece_dir / "meta.json").read_text())["config"]
    sweep = SimpleNamespace(config=config, grid=grid, common=())
    (piece_dir / "results.md").write_text(results_markdown(sweep, jobs))
    done = [j for j in jobs if j.status == "done"]
    drawn = figures.metric_figures(done, [v.name for v in grid], Path(config).stem)
    return figures.write_figures(drawn, piece_dir / "figures")


# -- reward noise of the fixed arms ------------------------------------------------

def _student_stage(run_dir: Path) -> str:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return [k for k in metrics["metrics"] if k != "teacher"][-1]


def step_losses(run_dir: Path, stage: str) -> dict[str, list[float]]:
    """The student stage's whole-model loss of every step, by term (TensorBoard)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard" / stage), size_guidance={"scalars": 0})
    events.Reload()
    return {t: [e.value for e in events.Scalars(f"loss/total/{t}")] for t in ("kd", "hidden", "attn")}


def rewards_for(losses: dict[str, list[float]], T: int) -> list[float]:
    """The combined reward of every round after the first, for rounds of T steps."""
    from optima.plugins.rewards.loss_decrement import combined_reward

    reward = combined_reward()
    n = min(len(v) for v in losses.values()) // T
    rounds = [{t: sum(v[r * T:(r + 1) * T]) for t, v in losses.items()} for r in range(n)]
    return [reward(a, b) for a, b in zip(rounds, rounds[1:])]


def noise_sd(series: list[list[float]]) -> float:
    """Round-to-round noise: sd of successive differences / sqrt 2 (a slow trend
    does not inflate it), pooled over seeds."""
    diffs = [b - a for xs in series for a, b in zip(xs, xs[1:])]
    return statistics.stdev(diffs) / math.sqrt(2) if len(diffs) > 1 else float("nan")


def reward_noise(sweep_dir: Path) -> dict:
    """Per fixed arm and round length T: mean reward and its noise sd; the spread of
    the arms' means against the mean noise sd (how many rounds it takes to tell
    the arms apart)."""
    runs: dict[str, list[Path]] = {}
    for metrics in sorted(sweep_dir.glob("fixed-*/seed-*/metrics.json")):
        run = metrics.parent
        # a student stage reused from the cache has no step log of its own in this run
        if (run / "tensorboard" / _student_stage(run)).is_dir():
            runs.setdefault(run.parent.name.removeprefix("fixed-"), []).append(run)
    if len(runs) < 2:
        return {}
    logs = {arm: [step_losses(d, _student_stage(d)) for d in dirs] for arm, dirs in runs.items()}
    out: dict = {"round_lengths": {}}
    for T in ROUND_LENGTHS:
        arms = {}
        for arm, seeds in logs.items():
            series = [rewards_for(losses, T) for losses in seeds]
            flat = [x for xs in series for x in xs]
            if len(flat) < 2:
                break
            arms[arm] = {"mean": statistics.mean(flat), "sd": statistics.stdev(flat), "noise_sd": noise_sd(series),
                         "rounds": len(series[0]) + 1}
        else:
            means = [a["mean"] for a in arms.values()]
            noise = statistics.mean(a["noise_sd"] for a in arms.values())
            spread = max(means) - min(means)
            out["round_lengths"][str(T)] = {"rounds": next(iter(arms.values()))["rounds"], "arm_mean_spread": spread,
                                            "mean_noise_sd": noise, "noise_over_spread": noise / spread if spread else None,
                                            "arms": arms}
    return out


# -- the summary page ------------------------------------------------------------

def _stats(xs: list[float]) -> tuple[float, float, int]:
    return (statistics.median(xs), statistics.stdev(xs) if len(xs) > 1 else float("nan"), len(xs))


def summary_rows(piece: Path) -> tuple[str, dict[str, tuple[float, float, int]], tuple | None]:
    """The student metric per variant and the teacher's, from results.csv."""
    with open(piece / "results.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "done"]
    if not rows:
        return "", {}, None
    # metric columns are `<network>/<metric>`; scoped bindings (`teacher/coca_model.arch`) have a dot
    metrics = [c for c in rows[0] if c.count("/") == 1 and "." not in c]
    teacher = next(c for c in metrics if c.startswith("teacher/"))
    student = next(c for c in metrics if not c.startswith("teacher/"))
    by_variant: dict[str, list[float]] = {}
    for r in rows:
        if r[student]:
            by_variant.setdefault(r["variant"], []).append(float(r[student]))
    teachers = {r["seed"]: float(r[teacher]) for r in rows if r[teacher]}
    return student, {v: _stats(xs) for v, xs in by_variant.items()}, _stats(list(teachers.values()))


def fmt(s: tuple[float, float, int] | None) -> str:
    if not s:
        return ""
    median, std, n = s
    return f"{median:.4f} ± {std:.4f} ({n})" if not math.isnan(std) else f"{median:.4f} ({n})"


#: What each variant name of the tables means (beside its bindings, read from results.csv).
GLOSSARY = {
    "teacher": "the fine-tuned teacher the students learn from (one per seed; the same in every piece of a task)",
    "optima": "OPTIMA as the config declares it: each round Thompson sampling (`optima_policy`) picks one arm, "
              "a set of modules whose layer losses are distilled, rewarded by how much the whole model's "
              "distillation losses fell (`combined_reward`)",
    "optima-probe": "OPTIMA with its reward measured on 4 fixed training batches before and after each round "
                    "instead of on the round's own losses (docs/method.md, \"The probe\")",
    "layerwise": "no bandit: every module's layer losses at every step (the paper's layerwise baseline)",
    "random": "an arm drawn uniformly at random each round",
    "task-only": "no teacher: the student trained on the task loss alone, from the same initialisation for the "
                 "same steps (every distillation weight 0)",
    "output-kd": "output distillation only: the task loss and the KL to the teacher's outputs at every step, no "
                 "layer (hidden, attention) losses, no bandit; not the KD-only *reward* (`kd_reward`), which "
                 "changes what rewards OPTIMA's arms",
    "reward-kd": "OPTIMA rewarded by the decrement of the output KD loss alone (`kd_reward`)",
    "reward-layerwise": "OPTIMA rewarded by the decrement of the hidden and attention losses (`layerwise_reward`)",
    "reward-combined": "OPTIMA rewarded by the paper's combined decrement (`combined_reward`, the config's)",
    "T20": "OPTIMA with T = 20 steps per round (45 rounds: the same 900 steps)",
    "T30": "OPTIMA with T = 30 steps per round (30 rounds)",
    "T45": "OPTIMA with T = 45 steps per round (20 rounds)",
    "gamma0.5": "OPTIMA with discount gamma = 0.5 (the config's: 0.9)",
    "gamma0.99": "OPTIMA with discount gamma = 0.99",
    "c1": "OPTIMA with the paper's posterior variance scale c = 1 (the config's: 1e-3)",
    "sw_ucb": "sliding-window UCB in place of OPTIMA's Thompson sampling (docs/policies.md)",
    "finer_arms": "arms over layer groups (2 per module) instead of whole modules, with per-unit Thompson "
                  "sampling (`grouped_ts_policy`)",
    # the task-aware candidates (docs/method.md, "Rewards that see the task")
    "heldout-empty": "OPTIMA rewarded by the signed relative decrement of the task loss on 4 held-out (val) "
                     "batches over the round (`heldout_task_reward`), with the empty arm (no layer losses)",
    "heldout-adv-empty": "as heldout-empty, the reward taken relative to every arm's recent rewards "
                         "(`advantage_reward`: no training-time trend)",
    "heldout-empty-norm": "as heldout-empty, with the hidden-state MSE divided by the teacher's variance",
    "adv-combined": "OPTIMA with the paper's reward taken relative to every arm's recent rewards (`advantage_reward`)",
    "alignment-empty": "OPTIMA rewarded by the round's mean cosine between the arm's distillation gradient and the "
                       "task gradient (`alignment_reward`), with the empty arm",
    "layerwise-gate": "layerwise, each module's layer losses dropped from a step while the cosine between their "
                      "gradient and the task gradient on that step's batch is negative (`alignment_gate`)",
    "layerwise-gate50": "layerwise, each module's layer losses dropped while the 50-step moving average of the "
                        "cosine between their gradient and the task gradient is negative (`alignment_gate`)",
    "layerwise-norm": "layerwise with the hidden-state MSE divided by the teacher's variance per layer "
                      "(`optima_loss.hidden_norm = 'teacher_var'`)",
    **{f"layerwise-norm-w{w}": f"layerwise-norm with the normalised hidden loss weighted {w} "
                               f"(`optima_loss.hidden_weight = {w}.0`; the configs' weight is 1)" for w in (2, 3, 8)},
    # the zoo's non-stationary policies on the task-aware pieces (docs/policies.md)
    "raw-ucb": "RAW-UCB (`raw_ucb_policy`, for rewards that rot with an arm's own plays) instead of the paper's "
               "policy, paper's reward",
    "glr-ucb": "GLR-UCB (`glr_ucb_policy`, restarts when it detects a change) instead of the paper's policy, "
               "paper's reward",
    "beta-gain-empty": "discounted Beta-Bernoulli Thompson sampling (`decayed_beta_ts_policy`) rewarded 1 when the "
                       "held-out task loss did not rise over the round, else 0 (`heldout_gain_reward`), with the "
                       "empty arm",
    # arms that leave at most one module out, and the encoders' arm (docs/method.md)
    "optima-loo": "OPTIMA over 4 arms instead of 7: all modules and each pair (no round distils one module alone)",
    "random-loo": "a uniformly random arm each round over optima-loo's 4 arms",
    "encoders": "the image and text encoders' layer losses every round, never the multimodal decoder's (the "
                "fixed arm image+text; picked after the first table, on these pieces' data)",
    "encoders-norm": "encoders with the hidden-state MSE divided by the teacher's variance",
}
NOT_BINDINGS = {"variant", "seed", "status", "wall_s", "run_dir", "error"}


def meaning(variant: str) -> str:
    if variant in GLOSSARY:
        return GLOSSARY[variant]
    if variant.startswith("fixed-"):
        return f"the same arm, {variant.removeprefix('fixed-')}, every round (`fixed_policy`)"
    return ""


def variant_bindings(piece: Path) -> dict[str, str]:
    """Each variant's bindings beyond the piece's config, from results.csv's binding columns."""
    with open(piece / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = [c for c in (rows[0] if rows else {}) if c not in NOT_BINDINGS and not (c.count("/") == 1 and "." not in c)]
    out: dict[str, str] = {}
    for r in rows:
        out.setdefault(r["variant"], "; ".join(f"{c} = {r[c]}" for c in columns if r[c]))
    return out


def glossary_lines(pieces: list[Path]) -> list[str]:
    bindings: dict[str, str] = {}
    for piece in pieces:
        for variant, text in variant_bindings(piece).items():
            bindings.setdefault(variant, text)
    lines = ["## Variants", "", "Every run is its piece's config (the command below) with the variant's bindings.", "",
             "| variant | what it is | bindings |", "|---|---|---|",
             f"| teacher | {GLOSSARY['teacher']} | |"]
    lines += [f"| {v} | {meaning(v)} | {'`' + b + '`' if b else '(none)'} |" for v, b in bindings.items()]
    return lines + [""]


def paired_tables(out: Path, pieces: list[str], tables: dict, variants: list[str]) -> list[str]:
    """Each variant against layerwise and against the task alone, seed by seed,
    per piece: the mean difference and the verdict of its bootstrap interval."""
    from optima import paired
    from optima.sweep import per_seed

    lines = []
    for against in (paired.DEFAULT_REFERENCE, paired.TASK_ALONE):
        cells: dict[str, dict[str, str]] = {}
        for p in pieces:
            jobs, _ = jobs_from_csv(out / p / "results.csv")
            metric = tables[p][0]
            for v, c in paired.compare_all(per_seed(jobs, metric), against, metric).items():
                cells.setdefault(v, {})[p] = f"{c.mean:+.4f} {c.verdict}"
        if not cells:
            continue
        lines += [f"### Against {against}, seed by seed", "",
                  f"Mean of the per-seed differences (variant minus {against}) and the verdict of its 95% "
                  "bootstrap interval (`optima/paired.py`; intervals in each piece's `results.md`).", "",
                  "| variant | " + " | ".join(pieces) + " |", "|---|" + "---:|" * len(pieces)]
        lines += [f"| {v} | " + " | ".join(cells.get(v, {}).get(p, "") for p in pieces) + " |"
                  for v in variants if v != against]
        lines.append("")
    return lines


def write_readme(out: Path = OUT) -> None:
    """`out/README.md`: the paper's comparison over every piece, the other pieces' tables,
    how each piece was made."""
    lines = ["# Evidence on the synthetic world", "",
             "Written by `python bench/synthetic_table.py` (do not edit by hand: rerun it).",
             "Each cell: student test metric, median ± sample std over seeds (n seeds). ",
             "Per piece: `results.md` (mean, std, paired comparisons), `results.csv` (every run), `figures/`, "
             "`reward_noise.json` and `meta.json` (command, machine, load, time). Variant names: \"Variants\" "
             "below.", ""]
    done = [p for p, *_ in PLAN if (out / p / "results.csv").exists()]
    # the paper's comparison: the pieces run with the baselines' variants, side by side
    baseline_pieces = [p for p, _, variants in PLAN if p in done and variants.endswith("baselines.toml")]
    if baseline_pieces:
        tables = {p: summary_rows(out / p) for p in baseline_pieces}
        variants = list(dict.fromkeys(v for _, rows, _ in tables.values() for v in rows))
        lines += ["## The paper's comparison", "",
                  "| variant | " + " | ".join(f"{p} ({tables[p][0]})" for p in baseline_pieces) + " |",
                  "|---|" + "---:|" * len(baseline_pieces),
                  "| teacher | " + " | ".join(fmt(tables[p][2]) for p in baseline_pieces) + " |"]
        for v in variants:
            lines.append(f"| {v} | " + " | ".join(fmt(tables[p][1].get(v)) for p in baseline_pieces) + " |")
        lines.append("")
        lines += paired_tables(out, baseline_pieces, tables, variants)
    task_aware = [p for p, _, variants in PLAN if p in done and variants.endswith("task_aware.toml")]
    if task_aware:
        lines += task_aware_section(out, task_aware)
    for p in (p for p in done if p not in baseline_pieces and p not in task_aware):
        student, rows, teacher = summary_rows(out / p)
        lines += [f"## {p}", "", f"| variant | {student} |", "|---|---:|"]
        lines += [f"| {v} | {fmt(s)} |" for v, s in rows.items()] + [""]
    lines += glossary_lines([out / p for p in done])
    lines += ["## How each piece was made", "",
              "| piece | command | wall time | load before/after | started | CPU |", "|---|---|---:|---|---|---|"]
    notes, total = [], 0.0
    for p in done:
        m = json.loads((out / p / "meta.json").read_text())
        if m.get("note"):  # how a piece was made when not in one pass of this script
            notes.append(f"- {p}: {m['note']}")
        if not m.get("students_from_cache", "0 of").startswith("0 of"):
            notes.append(f"- {p}: {m['students_from_cache']} runs took their student from the stage cache "
                         "(distilled with the same bindings by an earlier sweep): its wall time leaves them out")
        total += m["wall_s"]
        lines.append(f"| {p} | `{m['command']}` | {m['wall_s'] / 60:.1f} min | "
                     f"{m['load_average_before'][0]} / {m['load_average_after'][0]} | {m['started']} | "
                     f"{m['machine']['cpu']} |")
    if done:
        lines.append(f"| all {len(done)} of {len(PLAN)} pieces | | {total / 60:.1f} min | | | |")
    if any((out / p / "results.csv").exists() and "kd-only/" in (out / p / "results.csv").read_text()
           for p in done):
        notes.append("- `output-kd` (the task and output KD, no layer losses; not the KD-only reward of "
                     "`reward-kd`) was named `kd-only` when these pieces ran: their run directories say so")
    lines += [""] + notes if notes else []
    machines = {}
    for p in done:  # the same code and seeds give other numbers on another CPU: each piece says where it ran
        m = json.loads((out / p / "meta.json").read_text())["machine"]
        machines.setdefault(f"{m['cpu']}, {m['cores_available']} cores available, {m['platform']}, "
                            f"Python {m['python']}", []).append(p)
    if machines:
        lines += [""] + [f"Machine: {where} ({len(ps)} pieces)." for where, ps in machines.items()]
        lines += ["SWEEPS is `--sweeps` (default `sweeps/synthetic`)."]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def paired(rows: list[dict], student: str, variant: str, reference: str) -> tuple[float, int, int] | None:
    """Mean of `variant - reference` over the seeds both have, how many of them
    `variant` is above, and how many seeds there are."""
    by = {}
    for r in rows:
        if r["status"] == "done" and r[student]:
            by.setdefault(r["variant"], {})[r["seed"]] = float(r[student])
    a, b = by.get(variant, {}), by.get(reference, {})
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    return statistics.mean(diffs), sum(d > 0 for d in diffs), len(seeds)


def task_aware_section(out: Path, pieces: list[str]) -> list[str]:
    """Each candidate paired with layerwise, the task alone and the best fixed arm,
    seed by seed, on every task-aware piece; and which candidate meets the goal
    (above layerwise and the task alone on every piece, paired mean > 0 on at
    least 4 of 5 seeds; within one seed std of the best fixed arm on two)."""
    lines = ["## Task-aware candidates", "",
             "Each cell: median ± std (n) of the student's test metric; then, paired seed by seed with "
             "layerwise (`lw`), the task alone (`task`) and the piece's best fixed arm (`fixed`), the mean "
             "difference and on how many seeds the candidate is above. Made on the machine below, baselines "
             "included (the tables above were made on another CPU; numbers differ from machine to machine).", ""]
    goal: dict[str, list[bool]] = {}
    for p in pieces:
        with open(out / p / "results.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        student, stats, teacher = summary_rows(out / p)
        fixed = next((v for v in stats if v.startswith("fixed-")), None)
        refs = {"lw": "layerwise", "task": "task-only", "fixed": fixed}
        lines += [f"### {p} ({student}; teacher {fmt(teacher)})", "",
                  "| variant | median ± std (n) | vs lw | vs task | vs fixed |", "|---|---:|---:|---:|---:|"]
        for v, st in stats.items():
            cells = []
            for short, ref in refs.items():
                pr = paired(rows, student, v, ref) if ref and v != ref else None
                cells.append(f"{pr[0]:+.4f} ({pr[1]}/{pr[2]})" if pr else "")
            lines.append(f"| {v} | {fmt(st)} | " + " | ".join(cells) + " |")
            if v in refs.values():
                continue
            lw, task = paired(rows, student, v, "layerwise"), paired(rows, student, v, "task-only")
            beats = all(pr and pr[0] > 0 and pr[1] >= 4 and pr[2] >= 5 for pr in (lw, task))
            near = bool(fixed) and st[0] >= stats[fixed][0] - stats[fixed][1]
            goal.setdefault(v, []).append((beats, near))
        lines.append("")
    lines += ["Goal (above layerwise and the task alone on every piece, paired mean > 0 on at least 4 of 5 "
              "seeds, and within one seed std of the best fixed arm's median on at least two pieces):", ""]
    for v, results in goal.items():
        met = len(results) == len(pieces) and all(b for b, _ in results) and sum(n for _, n in results) >= 2
        lines.append(f"- {v}: {'met' if met else 'not met'} (above both on {sum(b for b, _ in results)} of "
                     f"{len(pieces)} pieces, near the best fixed arm on {sum(n for _, n in results)})")
    return lines + [""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each one torch thread)")
    p.add_argument("--sweeps", default="sweeps/synthetic", help="where the sweeps' run directories go")
    p.add_argument("--only", nargs="+", choices=[piece for piece, *_ in PLAN], help="these pieces only")
    p.add_argument("--summary-only", action="store_true", help="rewrite README.md from the kept results")
    p.add_argument("--gather", nargs="+", metavar=("PIECE", "SWEEP_DIR"),
                   help="keep PIECE from several sweeps of its config (made with its variants' bindings), "
                        "with --meta JSON describing how")
    p.add_argument("--meta", help="with --gather: a JSON file of the piece's meta (config, commands, times)")
    p.add_argument("--add", nargs="+", metavar=("PIECE", "SWEEP_DIR"),
                   help="add the runs of more sweeps of a kept PIECE's config to it, with --note saying how "
                        "they were made")
    p.add_argument("--note", help="with --add: the commands, load and times of the added sweeps")
    p.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                   help="with --add: a variant's name in the sweeps -> its name in the variants file")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: each kept piece's results.md and metric figures again from its results.csv, "
                        "then README.md")
    args = p.parse_args()
    sweeps = Path(args.sweeps).resolve()
    if args.gather:
        piece, *dirs = args.gather
        meta = {**json.loads(Path(args.meta).read_text()), "machine": machine()}
        keep_gathered(piece, [Path(d).resolve() for d in dirs], meta)
        report_piece(OUT / piece)
        args.summary_only = True
    if args.add:
        piece, *dirs = args.add
        if not dirs or not args.note:
            p.error("--add takes a piece, one or more sweep directories, and --note")
        rename = dict(r.split("=", 1) for r in args.rename)
        added = add_sweeps(piece, [Path(d).resolve() for d in dirs], args.note, rename)
        report_piece(OUT / piece)
        print(f"{piece}: {added} runs added")
        args.summary_only = True
    if args.report_only:
        for piece, *_ in PLAN:
            if (OUT / piece / "results.csv").exists() and (not args.only or piece in args.only):
                for path in report_piece(OUT / piece):
                    print(f"wrote {path.relative_to(ROOT)}")
    elif not args.summary_only:
        for piece, config, variants in PLAN:
            if args.only and piece not in args.only:
                continue
            keep(piece, sweeps / piece, run_piece(piece, config, variants, sweeps, args.jobs))
            write_readme()
    write_readme()
    print(f"results: {OUT / 'README.md'}")


if __name__ == "__main__":
    main()
