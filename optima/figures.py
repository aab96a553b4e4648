"""The figures of a run and of a sweep (the paper's Figures 3, 5 and 6).

One function per figure, each returning a matplotlib `Figure` (or None when the
data do not allow it), so that the same figure goes to a PNG and to
TensorBoard (`write_figures`). Drawn headless (Agg). Data come from the files
runs write, never from logs: `metrics.json` and the per-round logs
`rounds/<stage>.jsonl` (`optima.reporting.RoundLog`).

- `variant_metric_figure`: a metric per variant over seeds (Figure 3): each
  seed a dot, the median a diamond, bars of +-1 sample standard deviation;
  the teacher's median as a dashed line.
- `arm_posterior_figure`: each arm's mean reward as the policy estimates it,
  over rounds (Figure 5: Thompson sampling's posterior mean), for policies
  that report one (`Policy.diagnostics()["mean"]`), from each arm's first
  reward on; over several runs (seeds) their mean.
- `arm_plays_figure`: each arm's share of the plays over training (Figure 6),
  in bins of rounds, pooled over runs.
- With finer arms (`distillation.arm_groups`: more than `MAX_ARMS_DRAWN` arms
  made of layer groups), the same two by unit instead of by arm, as 63 arms
  cannot be told apart: `unit_effect_figure` (each unit's estimated effect on
  the reward, for policies that report `unit_effect`, e.g. `grouped_ts_policy`)
  and `unit_plays_figure` (the share of rounds that distilled each unit).

Arms are labelled by their modules and keep their colour in every figure.
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: PNG files and TensorBoard images only

from matplotlib.figure import Figure  # noqa: E402

from optima.reporting import read_round_log  # noqa: E402

DPI = 150
#: More arms than this are drawn by unit (module or layer group), not one by one.
MAX_ARMS_DRAWN = 20


@dataclass
class RoundLogData:
    """One run's rounds of one stage (`optima.reporting.RoundLog`)."""

    arms: list[str]
    rounds: list[dict[str, Any]]
    units: list[str] = field(default_factory=list)  # what arms are made of (modules or layer groups)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "RoundLogData":
        import json

        arms, rounds = read_round_log(path)
        with open(path, encoding="utf-8") as f:
            units = json.loads(f.readline()).get("units", [])
        return cls(arms, rounds, list(units))

    @property
    def by_unit(self) -> bool:
        """Too many arms to draw one by one, and the units they are made of known."""
        return len(self.arms) > MAX_ARMS_DRAWN and bool(self.units)


def arm_name(label: str) -> str:
    """'image+text' -> 'image + text'."""
    return " + ".join(label.split("+"))


def arm_colours(arms: Sequence[str]) -> dict[str, Any]:
    """A colour per arm, the same in every figure of a run or sweep."""
    import matplotlib.colors as mcolors
    from matplotlib import colormaps

    if len(arms) <= 10:
        colours = [colormaps["tab10"](i) for i in range(len(arms))]
    elif len(arms) <= 20:
        colours = [colormaps["tab20"](i) for i in range(len(arms))]
    else:
        cmap = colormaps["turbo"]
        colours = [cmap(i / max(1, len(arms) - 1)) for i in range(len(arms))]
    return {a: mcolors.to_hex(c) for a, c in zip(arms, colours)}


def _legend(ax, n: int, stacked: bool = False) -> None:
    """Outside the axes, on the right, so it never hides data; for stacked bars
    in the stack's order (top first)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8, reverse=stacked,
              ncols=1 if n <= 16 else 2, title="arm (modules)", title_fontsize=8)


# --- Figure 3 ---------------------------------------------------------------------------------

def variant_metric_figure(values: Mapping[str, Sequence[float]], metric: str, *, reference: str | None = None,
                          teacher: Sequence[float] = (), title: str | None = None) -> Figure | None:
    """A metric per variant over seeds. `values`: {variant: per-seed values}
    in display order (top to bottom); `reference` is drawn in another colour;
    `teacher`: the teacher's per-seed values (their median as a line)."""
    variants = [v for v, xs in values.items() if xs]
    if not variants:
        return None
    fig = Figure(figsize=(7.0, 0.9 + 0.42 * len(variants)), layout="constrained")
    ax = fig.add_subplot()
    for i, v in enumerate(variants):
        xs = list(values[v])
        y = len(variants) - 1 - i
        colour = "tab:red" if v == reference else "tab:blue"
        offsets = [((k % 5) - 2) * 0.06 for k in range(len(xs))]  # seeds spread vertically, never overlaid
        ax.scatter(xs, [y + o for o in offsets], s=12, color="0.55", zorder=2)
        median = statistics.median(xs)
        if len(xs) > 1:
            ax.errorbar(median, y, xerr=statistics.stdev(xs), fmt="none", ecolor=colour, elinewidth=1.5,
                        capsize=4, zorder=3)
        ax.scatter([median], [y], marker="D", s=40, color=colour, zorder=4)
    # the legend says what the marks are, in neutral grey (red marks the reference variant)
    ax.scatter([], [], s=12, color="0.55", label="single seed")
    ax.scatter([], [], marker="D", s=40, color="0.3", label="median over seeds")
    ax.errorbar([math.nan], [math.nan], xerr=[1.0], fmt="none", ecolor="0.3", elinewidth=1.5, capsize=4,
                label="±1 std over seeds")
    if reference in variants:
        ax.scatter([], [], marker="D", s=40, color="tab:red", label=f"{reference}: the reference variant")
    if teacher:
        t = statistics.median(teacher)
        ax.axvline(t, color="0.3", linestyle="--", linewidth=1, zorder=1, label=f"teacher (median {t:.4g})")
    ax.set_yticks(range(len(variants)),
                  [f"{v} (n={len(values[v])})" for v in reversed(variants)], fontsize=9)
    for tick, v in zip(ax.get_yticklabels(), reversed(variants)):
        if v == reference:
            tick.set_color("tab:red")
    ax.set_ylim(-0.6, len(variants) - 0.4)
    ax.set_xlabel(f"test {metric}")
    ax.grid(axis="x", color="0.9")
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    ax.set_title(title or f"{metric} per variant", fontsize=10)
    return fig


# --- Figure 5 ---------------------------------------------------------------------------------

def arm_posterior_figure(runs: Sequence[RoundLogData], title: str) -> Figure | None:
    """Each arm's estimated mean reward over rounds; None if the policy reports
    none (`Policy.diagnostics()["mean"]`)."""
    runs = [r for r in runs if r.rounds and all("mean" in x.get("policy", {}) for x in r.rounds)]
    if not runs:
        return None
    arms = runs[0].arms
    rounds = min(len(r.rounds) for r in runs)
    x = [runs[0].rounds[k]["round"] for k in range(rounds)]
    colours = arm_colours(arms)
    fig = Figure(figsize=(8.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for a, label in enumerate(arms):
        series = [[_posterior(r.rounds[k], a) for k in range(rounds)] for r in runs]
        columns = [[v for v in col if not math.isnan(v)] for col in zip(*series)]
        mean = [sum(c) / len(c) if c else math.nan for c in columns]
        ax.plot(x, mean, color=colours[label], linewidth=1.6, label=arm_name(label))
    ax.set_xlabel("round")
    ax.set_ylabel("mean reward as the policy estimates it\n(built-in rewards: relative loss decrease)")
    ax.axhline(0, color="0.6", linewidth=0.8)
    ax.grid(color="0.92")
    fig.suptitle(f"{title}: each arm's estimated mean reward (Thompson sampling: its posterior mean)", fontsize=10)
    what = f"mean over {len(runs)} runs" if len(runs) > 1 else "one run"
    ax.set_title(f"{what}; an arm's line starts at its first reward", fontsize=8, color="0.35")
    _legend(ax, len(arms))
    return fig


def _posterior(record: Mapping[str, Any], arm: int) -> float:
    """The arm's posterior mean after a round; NaN until the arm has a reward
    (the policy's count, else the engine's plays), where the mean is only a prior."""
    counts = record["policy"].get("count") or record.get("plays", {}).get("count")
    if counts is not None and counts[arm] == 0:
        return math.nan
    return record["policy"]["mean"][arm]


# --- Figure 6 ---------------------------------------------------------------------------------

def arm_plays_figure(runs: Sequence[RoundLogData], title: str, bins: int = 10) -> Figure | None:
    """Each arm's share of the plays in bins of rounds, pooled over `runs`
    (stacked to 100%); None without rounds."""
    runs = [r for r in runs if r.rounds]
    if not runs:
        return None
    arms = runs[0].arms
    rounds = max(len(r.rounds) for r in runs)
    width = math.ceil(rounds / bins)  # equal bins of whole rounds, the last one maybe shorter
    edges = list(range(0, rounds, width)) + [rounds]
    bins = len(edges) - 1
    shares = [[0.0] * bins for _ in arms]
    for b in range(bins):
        plays = [r.rounds[k]["arm"] for r in runs for k in range(edges[b], min(edges[b + 1], len(r.rounds)))]
        for a in range(len(arms)):
            shares[a][b] = 100.0 * plays.count(a) / len(plays) if plays else 0.0
    colours = arm_colours(arms)
    fig = Figure(figsize=(8.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    bottom = [0.0] * bins
    for a, label in enumerate(arms):
        ax.bar(range(bins), shares[a], bottom=bottom, width=0.85, color=colours[label], label=arm_name(label))
        bottom = [b + s for b, s in zip(bottom, shares[a])]
    ax.set_xticks(range(bins), [f"{edges[b] + 1}-{edges[b + 1]}" if edges[b + 1] - edges[b] > 1
                                else str(edges[b + 1]) for b in range(bins)],
                  fontsize=8, rotation=30 if bins > 8 else 0)
    ax.set_xlabel("rounds")
    ax.set_ylabel("share of plays (%)")
    ax.set_ylim(0, 100)
    fig.suptitle(f"{title}: each arm's share of the plays over training", fontsize=10)
    what = f"{len(runs)} runs pooled" if len(runs) > 1 else "one run"
    ax.set_title(f"{what}; bins of {width} round{'s' if width > 1 else ''}", fontsize=8, color="0.35")
    _legend(ax, len(arms), stacked=True)
    return fig


# --- finer arms: by unit -----------------------------------------------------------------------

def unit_effect_figure(runs: Sequence[RoundLogData], title: str) -> Figure | None:
    """Each unit's effect on the reward as the policy estimates it
    (`Policy.diagnostics()["unit_effect"]`), over rounds, mean over `runs`; None
    if the policy reports none."""
    runs = [r for r in runs if r.rounds and r.units and all("unit_effect" in x.get("policy", {}) for x in r.rounds)]
    if not runs:
        return None
    units, rounds = runs[0].units, min(len(r.rounds) for r in runs)
    x = [runs[0].rounds[k]["round"] for k in range(rounds)]
    colours = arm_colours(units)
    fig = Figure(figsize=(8.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for u, unit in enumerate(units):
        mean = [statistics.fmean(r.rounds[k]["policy"]["unit_effect"][u] for r in runs) for k in range(rounds)]
        ax.plot(x, mean, color=colours[unit], linewidth=1.6, label=unit)
    ax.set_xlabel("round")
    ax.set_ylabel("effect on the reward as the policy estimates it\n(built-in rewards: relative loss decrease)")
    ax.axhline(0, color="0.6", linewidth=0.8)
    ax.grid(color="0.92")
    fig.suptitle(f"{title}: each unit's estimated effect on the reward ({len(runs[0].arms)} arms of "
                 f"{len(units)} units)", fontsize=10)
    ax.set_title(f"mean over {len(runs)} runs" if len(runs) > 1 else "one run", fontsize=8, color="0.35")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8, title="unit",
              title_fontsize=8)
    return fig


def unit_plays_figure(runs: Sequence[RoundLogData], title: str, bins: int = 10) -> Figure | None:
    """The share of rounds that distilled each unit, in bins of rounds, pooled
    over `runs` (a round distils every unit of its arm, so shares add up to more
    than 100%); None without rounds or units."""
    runs = [r for r in runs if r.rounds and r.units]
    if not runs:
        return None
    units, arms = runs[0].units, runs[0].arms
    rounds = max(len(r.rounds) for r in runs)
    width = math.ceil(rounds / bins)
    edges = list(range(0, rounds, width)) + [rounds]
    colours = arm_colours(units)
    fig = Figure(figsize=(8.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    centres = [(edges[b] + edges[b + 1] + 1) / 2 for b in range(len(edges) - 1)]
    for unit in units:
        shares = []
        for b in range(len(edges) - 1):
            played = [arms[r.rounds[k]["arm"]] for r in runs for k in range(edges[b], min(edges[b + 1], len(r.rounds)))]
            shares.append(100.0 * sum(unit in label.split("+") for label in played) / len(played) if played else 0.0)
        ax.plot(centres, shares, color=colours[unit], linewidth=1.6, marker="o", markersize=3, label=unit)
    ax.set_xlabel("round")
    ax.set_ylabel("rounds that distilled the unit (%)")
    ax.set_ylim(0, 100)
    ax.grid(color="0.92")
    fig.suptitle(f"{title}: how often each unit was distilled ({len(arms)} arms of {len(units)} units)",
                 fontsize=10)
    what = f"{len(runs)} runs pooled" if len(runs) > 1 else "one run"
    ax.set_title(f"{what}; bins of {width} round{'s' if width > 1 else ''}", fontsize=8, color="0.35")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8, title="unit",
              title_fontsize=8)
    return fig


def stage_figures(data: Sequence[RoundLogData], title: str, name: str, single_arm_plays: bool = True
                  ) -> dict[str, Figure]:
    """Figures 5 and 6 of one stage's runs, by arm, or by unit for finer arms;
    `single_arm_plays`: draw the plays also when every run played one arm."""
    if data and data[0].by_unit:
        figures = {f"{name}-unit-effect": unit_effect_figure(data, title),
                   f"{name}-unit-plays": unit_plays_figure(data, title)}
    else:
        figures = {f"{name}-arm-posterior": arm_posterior_figure(data, title)}
        if single_arm_plays or len({x["arm"] for d in data for x in d.rounds}) > 1:
            figures[f"{name}-arm-plays"] = arm_plays_figure(data, title)
    return {k: v for k, v in figures.items() if v is not None}


# --- writing ------------------------------------------------------------------------------------

def write_figures(figures: Mapping[str, Figure], png_dir: str | os.PathLike,
                  tensorboard_dir: str | os.PathLike | None = None) -> list[Path]:
    """Each figure to `png_dir/<name>.png` (dpi 150, tight) and, with
    `tensorboard_dir`, as an image of that name in a TensorBoard run there
    (rewritten whole each time: it purges what an earlier report wrote)."""
    png_dir = Path(png_dir)
    png_dir.mkdir(parents=True, exist_ok=True)
    written = []
    writer = None
    if tensorboard_dir is not None and figures:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tensorboard_dir), purge_step=0)
    try:
        for name, fig in figures.items():
            path = png_dir / f"{name}.png"
            fig.savefig(path, dpi=DPI, bbox_inches="tight")
            written.append(path)
            if writer is not None:
                writer.add_figure(name, fig, global_step=0, close=False)
    finally:
        if writer is not None:
            writer.close()
    return written


def run_figures(run_dir: str | os.PathLike) -> dict[str, Figure]:
    """Figures 5 and 6 for each distillation stage of a run."""
    run_dir = Path(run_dir)
    out: dict[str, Figure] = {}
    for log in sorted((run_dir / "rounds").glob("*.jsonl")):
        out.update(stage_figures([RoundLogData.read(log)], log.stem, log.stem))
    return out


def write_run_figures(run_dir: str | os.PathLike) -> list[Path]:
    """A run's figures to `RUN_DIR/figures/` and the TensorBoard run `RUN_DIR/tensorboard/figures`."""
    run_dir = Path(run_dir)
    return write_figures(run_figures(run_dir), run_dir / "figures", run_dir / "tensorboard" / "figures")


def sweep_figures(sweep) -> dict[str, Figure]:
    """A sweep's figures (`optima.sweep.Sweep`): Figure 3 for each metric of each
    student network; Figures 5 and 6 for each variant and stage whose runs
    logged a posterior or played more than one arm."""
    jobs = [j for j in sweep.jobs() if j.status == "done"]
    variants = [v.name for v in sweep.grid]
    reference = variants[0] if variants else None
    out: dict[str, Figure] = {}
    metrics = []
    for j in jobs:
        metrics += [m for m in j.metrics if m not in metrics]
    config = Path(sweep.config).stem
    for metric in metrics:
        network, name = metric.split("/", 1)
        if network == "teacher":
            continue
        values = {v: [j.metrics[metric] for j in jobs if j.variant == v and metric in j.metrics] for v in variants}
        teacher = [j.metrics[f"teacher/{name}"] for j in jobs if f"teacher/{name}" in j.metrics]
        fig = variant_metric_figure(values, name, reference=reference, teacher=teacher,
                                    title=f"{config}: {network} {name} per variant")
        if fig is not None:
            out[f"{network}-{name}-per-variant"] = fig
    for v in variants:
        logs: dict[str, list[RoundLogData]] = {}
        for j in jobs:
            if j.variant == v:
                for log in sorted((j.run_dir / "rounds").glob("*.jsonl")):
                    logs.setdefault(log.stem, []).append(RoundLogData.read(log))
        for stage, data in logs.items():
            title = f"{v} ({stage})" if len(logs) > 1 else v
            out.update(stage_figures(data, title, f"{v}-{stage}", single_arm_plays=False))
    return out


def write_sweep_figures(sweep) -> list[Path]:
    """A sweep's figures to `SWEEP_DIR/figures/` and `SWEEP_DIR/tensorboard/figures`."""
    return write_figures(sweep_figures(sweep), sweep.dir / "figures", sweep.dir / "tensorboard" / "figures")
