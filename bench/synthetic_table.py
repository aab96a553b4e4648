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
]
ROUND_LENGTHS = (5, 10, 20, 40)


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": model, "cores_available": len(os.sched_getaffinity(0)), "platform": platform.platform(),
            "python": platform.python_version()}


def run_piece(piece: str, config: str, variants: str, sweeps: Path, jobs: int) -> dict:
    sweep_dir = sweeps / piece
    cmd = [sys.executable, "-m", "optima.cli.main", "sweep", config, "--variants", variants,
           "--jobs", str(jobs), "--sweep-dir", str(sweep_dir)]
    load_before, start = os.getloadavg(), time.time()
    print(f"== {piece}: {' '.join(cmd[2:])}", flush=True)
    code = subprocess.call(cmd, cwd=ROOT)
    wall = time.time() - start
    subprocess.call([sys.executable, "-m", "optima.cli.main", "report", str(sweep_dir)], cwd=ROOT,
                    stdout=subprocess.DEVNULL)
    return {"piece": piece, "config": config, "variants": variants, "sweep_exit_code": code,
            "command": f"optima sweep {config} --variants {variants} --jobs {jobs} --sweep-dir SWEEPS/{piece}",
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)), "wall_s": round(wall, 1),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()], "machine": machine()}


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
             "`reward_noise.json` and `meta.json` (command, machine, load, time).", ""]
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
    for p in (p for p in done if p not in baseline_pieces):
        student, rows, teacher = summary_rows(out / p)
        lines += [f"## {p}", "", f"| variant | {student} |", "|---|---:|"]
        lines += [f"| {v} | {fmt(s)} |" for v, s in rows.items()] + [""]
    lines += ["## How each piece was made", "", "| piece | command | wall time | load before/after | started |",
              "|---|---|---:|---|---|"]
    notes, total = [], 0.0
    for p in done:
        m = json.loads((out / p / "meta.json").read_text())
        if m.get("note"):  # how a piece was made when not in one pass of this script
            notes.append(f"- {p}: {m['note']}")
        total += m["wall_s"]
        lines.append(f"| {p} | `{m['command']}` | {m['wall_s'] / 60:.1f} min | "
                     f"{m['load_average_before'][0]} / {m['load_average_after'][0]} | {m['started']} |")
    if done:
        lines.append(f"| all {len(done)} of {len(PLAN)} pieces | | {total / 60:.1f} min | | |")
    if any((out / p / "results.csv").exists() and "kd-only/" in (out / p / "results.csv").read_text()
           for p in done):
        notes.append("- `output-kd` (the task and output KD, no layer losses; not the KD-only reward of "
                     "`reward-kd`) was named `kd-only` when these pieces ran: their run directories say so")
    lines += [""] + notes if notes else []
    if done:
        m = json.loads((out / done[0] / "meta.json").read_text())["machine"]
        lines += ["", f"Machine: {m['cpu']}, {m['cores_available']} cores available, {m['platform']}, "
                      f"Python {m['python']}. SWEEPS is `--sweeps` (default `sweeps/synthetic`)."]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each one torch thread)")
    p.add_argument("--sweeps", default="sweeps/synthetic", help="where the sweeps' run directories go")
    p.add_argument("--only", nargs="+", choices=[piece for piece, *_ in PLAN], help="these pieces only")
    p.add_argument("--summary-only", action="store_true", help="rewrite README.md from the kept results")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: each kept piece's results.md and metric figures again from its results.csv, "
                        "then README.md")
    args = p.parse_args()
    sweeps = Path(args.sweeps).resolve()
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
