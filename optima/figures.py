"""The figures of a run and of a sweep (the paper's Figures 3, 5 and 6).

One function per figure, each returning a matplotlib `Figure` (or None when the
data do not allow it), so that the same figure goes to a PNG and to
TensorBoard (`write_figures`). Drawn headless (Agg). Data come from the files
runs write, never from logs: `metrics.json` and the per-round logs
`rounds/<stage>.jsonl` (`optima.reporting.RoundLog`).

- `variant_metric_figure`: a metric per variant over seeds (Figure 3): each
  seed a dot, the median a diamond, bars of +-1 sample standard deviation;
  the teacher's median over seeds as a dashed line, the task alone's median
  (`task-only`) as a dotted one.
- `paired_difference_figure`: each variant minus the reference (`layerwise`)
  and minus the task alone, seed by seed, with the bootstrap interval of the
  mean difference and its verdict (`optima.paired`).
- `arm_posterior_figure`: each arm's mean reward as the policy estimates it,
  over rounds (Figure 5: Thompson sampling's posterior mean), for policies
  that report one (`Policy.diagnostics()["mean"]`), from each arm's first
  reward on, with the estimate's sd as a band where the policy reports `sd`;
  over several runs (seeds) their mean.
- `arm_plays_figure`: each arm's share of the plays over training (Figure 6),
  in bins of rounds, pooled over runs.
- With finer arms (`distillation.arm_groups`: more than `MAX_ARMS_DRAWN` arms
  made of layer groups), the same two by unit instead of by arm, as 63 arms
  cannot be told apart: `unit_effect_figure` (each unit's estimated effect on
  the reward, for policies that report `unit_effect`, e.g. `grouped_ts_policy`)
  and `unit_plays_figure` (the share of rounds that distilled each unit).

Round axes have integer ticks; the rounds played from a policy's warm-up order
(it reports `warmup`, `optima.plugins.policies.base.WarmupPolicy`) are shaded;
legends give each arm's number of plays, what its estimate rests on; labels
name the run's policy and reward (`components`, from `operative_config.gin`).
Values a log holds as null (NaN, inf) leave gaps; a figure that cannot be
drawn costs one `optima: warning:` line (`warn`), never the other figures.
Arms are labelled by their modules and keep their colour in every figure.
"""
from __future__ import annotations

import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: PNG files and TensorBoard images only

from matplotlib.figure import Figure  # noqa: E402

from optima.errors import OptimaError, warning  # noqa: E402
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
                          teacher: Sequence[float] = (), task_alone: str | None = None,
                          title: str | None = None) -> Figure | None:
    """A metric per variant over seeds. `values`: {variant: per-seed values}
    in display order (top to bottom); `reference` is drawn in another colour;
    `teacher`: the teacher's values, one per seed (their median as a line);
    `task_alone`: the variant whose median is drawn as the task-alone line."""
    values = {v: [x for x in xs if _finite(x)] for v, xs in values.items()}
    variants = [v for v, xs in values.items() if xs]
    if not variants:
        return None
    fig = Figure(figsize=(9.0, 0.9 + 0.42 * len(variants)), layout="constrained")
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
    teacher = [x for x in teacher if _finite(x)]
    if teacher:
        t = statistics.median(teacher)
        ax.axvline(t, color="0.3", linestyle="--", linewidth=1, zorder=1,
                   label=f"teacher (median {t:.4g} of {len(teacher)} seeds)")
    if task_alone in variants:
        t = statistics.median(values[task_alone])
        ax.axvline(t, color="tab:orange", linestyle=":", linewidth=1.5, zorder=1,
                   label=f"task alone ({task_alone}, median {t:.4g})")
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


VERDICT_COLOURS = {"better": "tab:green", "worse": "tab:red", "tie": "0.35", "n < 2": "0.6"}


def paired_difference_figure(comparisons: Mapping[str, Mapping[str, Any]], variants: Sequence[str], metric: str,
                             title: str | None = None) -> Figure | None:
    """Each variant minus each reference, seed by seed (`optima.paired`): one
    panel per reference (`comparisons`: {reference: {variant: Paired}}), a row
    per variant in `variants` order: the per-seed differences as dots, their mean
    as a diamond and its bootstrap interval as a bar, coloured by the verdict."""
    from matplotlib.ticker import MaxNLocator

    from optima import paired

    comparisons = {a: c for a, c in comparisons.items() if c}
    if not comparisons:
        return None
    rows = [v for v in variants if any(v in c or v == a for a, c in comparisons.items())]
    fig = Figure(figsize=(4.2 * len(comparisons) + 2.2, 1.1 + 0.36 * len(rows)), layout="constrained")
    axes = fig.subplots(1, len(comparisons), sharey=True, squeeze=False)[0]
    for ax, (against, by_variant) in zip(axes, comparisons.items()):
        for i, v in enumerate(rows):
            y = len(rows) - 1 - i
            p = by_variant.get(v)
            if v == against:
                ax.text(0, y, "reference", ha="center", va="center", fontsize=8, color="0.35")
                continue
            if p is None:
                continue
            colour = VERDICT_COLOURS.get(p.verdict, "0.35")
            offsets = [((k % 5) - 2) * 0.06 for k in range(p.n)]
            ax.scatter(p.differences, [y + o for o in offsets], s=10, color="0.6", zorder=2)
            if p.n > 1:
                ax.plot([p.low, p.high], [y, y], color=colour, linewidth=2.2, solid_capstyle="butt", zorder=3)
            ax.scatter([p.mean], [y], marker="D", s=34, color=colour, zorder=4)
        ax.axvline(0, color="0.3", linewidth=0.9, zorder=1)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # tick labels of small differences never overlap
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", color="0.9")
        ax.set_axisbelow(True)
        ax.set_xlabel(f"{metric}: variant − {against}\n(per seed)", fontsize=9)
        ax.set_title(f"against {against}", fontsize=9)
    counts = {v: max((c[v].n for c in comparisons.values() if v in c), default=0) for v in rows}
    axes[0].set_yticks(range(len(rows)), [f"{v} ({counts[v]} seeds)" if counts[v] else v for v in reversed(rows)],
                       fontsize=8)
    axes[0].set_ylim(-0.6, len(rows) - 0.4)
    handles = [axes[-1].scatter([], [], s=10, color="0.6", label="one seed's difference")]
    handles += [axes[-1].scatter([], [], marker="D", s=34, color=c, label=f"mean, {verdict}")
                for verdict, c in VERDICT_COLOURS.items() if verdict != "n < 2"]
    better = "higher" if paired.higher_is_better(metric) else "lower"
    axes[-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=8,
                    title=f"bar: {paired.LEVEL:.0%} bootstrap interval\nof the mean; better/worse when\n"
                          f"it excludes 0 ({better} is better)", title_fontsize=8)
    fig.suptitle(title or f"{metric}: paired differences", fontsize=10)
    return fig


# --- Figure 5 ---------------------------------------------------------------------------------

def _finite(x: Any) -> bool:
    """A number that is not NaN or inf (a round log writes those as null)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _value(x: Any) -> float:
    return float(x) if _finite(x) else math.nan


def warmup_end(runs: Sequence[RoundLogData]) -> int | None:
    """The last round played from the policy's warm-up order (the policy reports
    `warmup` = 1 while its next arm still comes from it: the rounds until the
    first record with 0, that one included); None if the policy reports none."""
    ends = []
    for r in runs:
        flags = [x.get("policy", {}).get("warmup") for x in r.rounds]
        if not flags or not all(_finite(f) for f in flags):
            return None
        ends.append(next((x["round"] for x, f in zip(r.rounds, flags) if not f), r.rounds[-1]["round"]))
    return max(ends) if ends else None


def _shade_warmup(ax, end: int | None, over: bool = False) -> None:
    """Grey behind the lines, or hatched `over` bars that would hide grey."""
    if not end:
        return
    label = f"warm-up (rounds 1-{end})"
    if over:
        ax.axvspan(0.5, end + 0.5, facecolor="none", edgecolor="0.15", hatch="//", linewidth=0, zorder=3,
                   label=label)
    else:
        ax.axvspan(0.5, end + 0.5, color="0.9", zorder=0, label=label)


def _round_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def _plays(runs: Sequence[RoundLogData], arm: int) -> int:
    return sum(x["arm"] == arm for r in runs for x in r.rounds)


def _plays_label(runs: Sequence[RoundLogData], arm: int, label: str) -> str:
    n = _plays(runs, arm)
    return f"{arm_name(label)} ({n} play{'s' if n != 1 else ''})"


def arm_posterior_figure(runs: Sequence[RoundLogData], title: str, policy: str = "the policy",
                         reward: str | None = None) -> Figure | None:
    """Each arm's estimated mean reward over rounds, its estimate's sd as a band
    when the policy reports one (`sd`), the warm-up rounds shaded; None if the
    policy reports no mean (`Policy.diagnostics()["mean"]`). Missing values (null,
    NaN) leave gaps. `policy`, `reward`: their names, for the labels."""
    runs = [r for r in runs if r.rounds and all("mean" in x.get("policy", {}) for x in r.rounds)]
    if not runs:
        return None
    arms = runs[0].arms
    rounds = min(len(r.rounds) for r in runs)
    x = [runs[0].rounds[k]["round"] for k in range(rounds)]
    colours = arm_colours(arms)
    with_sd = all("sd" in r.rounds[k]["policy"] for r in runs for k in range(rounds))
    fig = Figure(figsize=(8.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    _shade_warmup(ax, warmup_end(runs))
    for a, label in enumerate(arms):
        mean = _mean_over_runs([[_posterior(r.rounds[k], a) for k in range(rounds)] for r in runs])
        ax.plot(x, mean, color=colours[label], linewidth=1.6, label=_plays_label(runs, a, label))
        if with_sd:
            sd = _mean_over_runs([[_posterior(r.rounds[k], a, "sd") for k in range(rounds)] for r in runs])
            ax.fill_between(x, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                            color=colours[label], alpha=0.12, linewidth=0)
    _round_axis(ax)
    ax.set_xlim(0.5, x[-1] + 0.5)
    ax.set_ylabel(f"mean reward as {policy} estimates it\n(reward: {reward})" if reward
                  else f"mean reward as {policy} estimates it")
    ax.axhline(0, color="0.6", linewidth=0.8)
    ax.grid(color="0.92")
    fig.suptitle(f"{title}: each arm's estimated mean reward ({policy})", fontsize=10)
    what = f"mean over {len(runs)} runs" if len(runs) > 1 else "one run"
    band = "; band: ±1 sd of the estimate" if with_sd else ""
    ax.set_title(f"{what}; a line starts at the arm's first reward{band}; plays: the estimate rests on them",
                 fontsize=8, color="0.35")
    _legend(ax, len(arms))
    return fig


def _mean_over_runs(series: Sequence[Sequence[float]]) -> list[float]:
    """Per round, the mean of the runs' finite values (NaN where none is)."""
    columns = [[v for v in col if not math.isnan(v)] for col in zip(*series)]
    return [sum(c) / len(c) if c else math.nan for c in columns]


def _posterior(record: Mapping[str, Any], arm: int, stat: str = "mean") -> float:
    """The arm's posterior `stat` after a round; NaN until the arm has a reward
    (the policy's count, else the engine's plays), where it is only a prior, and
    where the log holds no number."""
    policy = record["policy"]
    counts = policy.get("count") or record.get("plays", {}).get("count")
    if isinstance(counts, list) and arm < len(counts) and counts[arm] == 0:
        return math.nan
    values = policy.get(stat)
    if not isinstance(values, list) or arm >= len(values):
        return math.nan
    return _value(values[arm])


# --- Figure 6 ---------------------------------------------------------------------------------

def arm_plays_figure(runs: Sequence[RoundLogData], title: str, bins: int = 10, policy: str | None = None
                     ) -> Figure | None:
    """Each arm's share of the plays in bins of rounds, pooled over `runs`
    (stacked to 100%), the warm-up rounds shaded; None without rounds."""
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
    _shade_warmup(ax, warmup_end(runs), over=True)
    # a bin of rounds k+1..m spans [k + 0.5, m + 0.5] on the round axis
    lefts = [edges[b] + 0.5 for b in range(bins)]
    widths = [0.9 * (edges[b + 1] - edges[b]) for b in range(bins)]
    bottom = [0.0] * bins
    for a, label in enumerate(arms):
        ax.bar(lefts, shares[a], bottom=bottom, width=widths, align="edge", color=colours[label],
               label=_plays_label(runs, a, label))
        bottom = [b + s for b, s in zip(bottom, shares[a])]
    _round_axis(ax)
    ax.set_xlim(0.5, rounds + 0.5)
    ax.set_ylabel("share of plays (%)")
    ax.set_ylim(0, 100)
    fig.suptitle(f"{title}: each arm's share of the plays over training" + (f" ({policy})" if policy else ""),
                 fontsize=10)
    what = f"{len(runs)} runs pooled" if len(runs) > 1 else "one run"
    ax.set_title(f"{what}; bins of {width} round{'s' if width > 1 else ''}; legend: plays of each arm",
                 fontsize=8, color="0.35")
    _legend(ax, len(arms), stacked=True)
    return fig


# --- finer arms: by unit -----------------------------------------------------------------------

def unit_effect_figure(runs: Sequence[RoundLogData], title: str, policy: str = "the policy",
                       reward: str | None = None) -> Figure | None:
    """Each unit's effect on the reward as the policy estimates it
    (`Policy.diagnostics()["unit_effect"]`), over rounds, mean over `runs`, the
    warm-up rounds shaded; None if the policy reports none."""
    runs = [r for r in runs if r.rounds and r.units and all("unit_effect" in x.get("policy", {}) for x in r.rounds)]
    if not runs:
        return None
    units, rounds = runs[0].units, min(len(r.rounds) for r in runs)
    x = [runs[0].rounds[k]["round"] for k in range(rounds)]
    colours = arm_colours(units)
    fig = Figure(figsize=(8.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    _shade_warmup(ax, warmup_end(runs))
    for u, unit in enumerate(units):
        mean = _mean_over_runs([[_unit_value(r.rounds[k], u) for k in range(rounds)] for r in runs])
        ax.plot(x, mean, color=colours[unit], linewidth=1.6, label=unit)
    _round_axis(ax)
    ax.set_ylabel(f"effect on the reward as {policy} estimates it" + (f"\n(reward: {reward})" if reward else ""))
    ax.axhline(0, color="0.6", linewidth=0.8)
    ax.grid(color="0.92")
    fig.suptitle(f"{title}: each unit's estimated effect on the reward ({len(runs[0].arms)} arms of "
                 f"{len(units)} units; {policy})", fontsize=10)
    ax.set_title(f"mean over {len(runs)} runs" if len(runs) > 1 else "one run", fontsize=8, color="0.35")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8, title="unit",
              title_fontsize=8)
    return fig


def _unit_value(record: Mapping[str, Any], unit: int) -> float:
    values = record["policy"].get("unit_effect")
    return _value(values[unit]) if isinstance(values, list) and unit < len(values) else math.nan


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
    _shade_warmup(ax, warmup_end(runs))
    _round_axis(ax)
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


Warn = Callable[[str], None]


def warn_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _draw(figures: dict[str, Figure], name: str, make: Callable[[], Figure | None], warn: Warn) -> None:
    """`figures[name] = make()`; a figure that cannot be drawn is a warning, never
    the loss of the others (or of the run)."""
    try:
        fig = make()
    except Exception as e:  # noqa: BLE001 (any plugin's diagnostics may hold what a figure cannot draw)
        warn(warning(f"figure {name} not drawn: {type(e).__name__}: {e}"))
        return
    if fig is not None:
        figures[name] = fig


def stage_figures(data: Sequence[RoundLogData], title: str, name: str, single_arm_plays: bool = True,
                  policy: str = "the policy", reward: str | None = None, warn: Warn = warn_stderr
                  ) -> dict[str, Figure]:
    """Figures 5 and 6 of one stage's runs, by arm, or by unit for finer arms;
    `single_arm_plays`: draw the plays also when every run played one arm;
    `policy`, `reward`: the names the labels give."""
    figures: dict[str, Figure] = {}
    if data and data[0].by_unit:
        _draw(figures, f"{name}-unit-effect", lambda: unit_effect_figure(data, title, policy, reward), warn)
        _draw(figures, f"{name}-unit-plays", lambda: unit_plays_figure(data, title), warn)
    else:
        _draw(figures, f"{name}-arm-posterior", lambda: arm_posterior_figure(data, title, policy, reward), warn)
        if single_arm_plays or len({x["arm"] for d in data for x in d.rounds}) > 1:
            _draw(figures, f"{name}-arm-plays", lambda: arm_plays_figure(data, title, policy=policy), warn)
    return figures


COMPONENT = re.compile(r"^(?:(?P<scope>[\w.]+)/)?distillation\.(?P<what>policy|reward) = @(?P<name>[\w./]+)")


def components(run_dir: str | os.PathLike, stage: str, operative: str | None = None) -> tuple[str, str | None]:
    """The names of the policy and reward a run's stage used, from its
    operative config (`operative`, else the run's `operative_config.gin`);
    'the policy' and None where it does not say."""
    found: dict[str, str] = {}
    if operative is None:
        try:
            operative = (Path(run_dir) / "operative_config.gin").read_text(encoding="utf-8", errors="replace")
        except OSError:
            operative = ""
    for line in operative.splitlines():
        m = COMPONENT.match(line)
        if m and m["scope"] in (None, stage) and (m["scope"] == stage or m["what"] not in found):
            found[m["what"]] = m["name"]
    return found.get("policy", "the policy"), found.get("reward")


def read_logs(paths: Sequence[Path], warn: Warn) -> list[tuple[Path, RoundLogData]]:
    """The readable round logs of `paths`, each with its path; one warning for each that is not."""
    out = []
    for path in paths:
        try:
            out.append((path, RoundLogData.read(path)))
        except (OptimaError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            warn(warning(f"{path}: unreadable round log ({type(e).__name__}: {e}); its figures are left out"))
    return out


# --- writing ------------------------------------------------------------------------------------

def write_figures(figures: Mapping[str, Figure], png_dir: str | os.PathLike,
                  tensorboard_dir: str | os.PathLike | None = None, warn: Warn = warn_stderr) -> list[Path]:
    """Each figure to `png_dir/<name>.png` (dpi 150, tight) and, with
    `tensorboard_dir`, as an image of that name in a TensorBoard run there
    (rewritten whole each time: it purges what an earlier report wrote). A
    figure that cannot be saved is a warning; the others are written."""
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
            try:
                fig.savefig(path, dpi=DPI, bbox_inches="tight")
                if writer is not None:
                    writer.add_figure(name, fig, global_step=0, close=False)
            except (ValueError, TypeError, OverflowError, RuntimeError) as e:  # matplotlib's, on values it cannot lay out
                warn(warning(f"figure {name} not written: {type(e).__name__}: {e}"))
                continue
            written.append(path)
    finally:
        if writer is not None:
            writer.close()
    return written


def run_figures(run_dir: str | os.PathLike, warn: Warn = warn_stderr, operative: str | None = None
                ) -> dict[str, Figure]:
    """Figures 5 and 6 for each distillation stage of a run (`operative`: its
    operative config's text, when the run has not written it yet)."""
    run_dir = Path(run_dir)
    out: dict[str, Figure] = {}
    for log, data in read_logs(sorted((run_dir / "rounds").glob("*.jsonl")), warn):
        policy, reward = components(run_dir, log.stem, operative)
        out.update(stage_figures([data], log.stem, log.stem, policy=policy, reward=reward, warn=warn))
    return out


def write_run_figures(run_dir: str | os.PathLike, warn: Warn = warn_stderr, operative: str | None = None
                      ) -> list[Path]:
    """A run's figures to `RUN_DIR/figures/` and the TensorBoard run `RUN_DIR/tensorboard/figures`."""
    run_dir = Path(run_dir)
    return write_figures(run_figures(run_dir, warn, operative), run_dir / "figures", run_dir / "tensorboard" / "figures",
                         warn)


def metric_figures(jobs: Sequence[Any], variants: Sequence[str], config: str, warn: Warn = warn_stderr
                   ) -> dict[str, Figure]:
    """Figure 3 and the paired differences for each student metric of finished
    `jobs` (`optima.sweep.Job`s: variant, seed, metrics): `<network>-<metric>-per-variant`
    and `<network>-<metric>-paired`. The teacher's line is its median over seeds
    (one teacher per seed, shared by the variants)."""
    from optima import paired
    from optima.sweep import per_seed, teacher_per_seed

    reference = paired.reference_variant(list(variants))
    out: dict[str, Figure] = {}
    metrics: list[str] = []
    for j in jobs:
        metrics += [m for m in j.metrics if m not in metrics]
    for metric in metrics:
        network, name = metric.split("/", 1)
        if network == "teacher":
            continue
        seeds = per_seed(jobs, metric)
        values = {v: list(seeds.get(v, {}).values()) for v in variants}
        teacher = [x for xs in teacher_per_seed(jobs, f"teacher/{name}").values() for x in xs]
        _draw(out, f"{network}-{name}-per-variant", lambda: variant_metric_figure(
            values, name, reference=reference, teacher=teacher, task_alone=paired.TASK_ALONE,
            title=f"{config}: {network} {name} per variant"), warn)
        against = {a: paired.compare_all(seeds, a, metric) for a in paired.references(list(variants))}
        _draw(out, f"{network}-{name}-paired", lambda: paired_difference_figure(
            against, list(variants), name, title=f"{config}: {network} {name}, each variant against "
            + " and ".join(a for a in against if against[a]) + ", seed by seed"), warn)
    return out


def sweep_figures(sweep, warn: Warn = warn_stderr) -> dict[str, Figure]:
    """A sweep's figures (`optima.sweep.Sweep`): `metric_figures`, and Figures 5
    and 6 for each variant and stage whose runs logged a posterior or played
    more than one arm."""
    jobs = [j for j in sweep.jobs() if j.status == "done"]
    variants = [v.name for v in sweep.grid]
    out = metric_figures(jobs, variants, Path(sweep.config).stem, warn)
    for v in variants:
        logs: dict[str, list[RoundLogData]] = {}
        names: dict[str, tuple[str, str | None]] = {}
        for j in jobs:
            if j.variant == v:
                for log, data in read_logs(sorted((j.run_dir / "rounds").glob("*.jsonl")), warn):
                    logs.setdefault(log.stem, []).append(data)
                    names.setdefault(log.stem, components(j.run_dir, log.stem))
        for stage, data in logs.items():
            title = f"{v} ({stage})" if len(logs) > 1 else v
            policy, reward = names[stage]
            out.update(stage_figures(data, title, f"{v}-{stage}", single_arm_plays=False, policy=policy,
                                     reward=reward, warn=warn))
    return out


def write_sweep_figures(sweep, warn: Warn = warn_stderr) -> list[Path]:
    """A sweep's figures to `SWEEP_DIR/figures/` and `SWEEP_DIR/tensorboard/figures`."""
    return write_figures(sweep_figures(sweep, warn), sweep.dir / "figures", sweep.dir / "tensorboard" / "figures",
                         warn)
