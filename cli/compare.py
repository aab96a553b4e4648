"""`optima compare A B`: two finished runs or sweeps side by side, in a table
that fits 80 columns: each test metric (a sweep's: the median over a variant's
seeds) and each arm's share of the plays of each distillation stage (a sweep's:
pooled over a variant's runs), A's, B's and B - A.

What is compared: a run with a run, a run with every variant of a sweep, and two
sweeps variant by variant (by name; a variant only one sweep has shows a blank
on the other side). Read from the files runs write (`metrics.json`, and a
sweep's `sweep.json`), never from logs.
"""
from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import typer

from optima.errors import ConfigError
from optima.program import program

WIDTH = 80
VALUE = 11  # characters of a value column


@dataclass
class Entry:
    """One run, or the finished runs of one variant of a sweep."""

    metrics: dict[str, list[float]] = field(default_factory=dict)  # '<network>/<metric>': a value per run
    plays: dict[str, Counter] = field(default_factory=dict)  # stage: plays of each arm label
    arms: dict[str, list[str]] = field(default_factory=dict)  # stage: its arms in their order
    runs: int = 0

    def add_run(self, run_dir: Path) -> None:
        summary = json.loads((run_dir / "metrics.json").read_text())
        for network, metrics in summary.get("metrics", {}).items():
            for name, value in metrics.items():
                if value is not None:  # metrics.json holds NaN as null
                    self.metrics.setdefault(f"{network}/{name}", []).append(float(value))
        for stage, record in summary.get("stages", {}).items():
            arms, plays = record.get("arms"), record.get("plays")
            if arms and plays:
                self.plays.setdefault(stage, Counter()).update(arms[a] for a in plays)
                self.arms.setdefault(stage, list(arms))
        self.runs += 1


def load(path: str) -> tuple[str, dict[str, Entry]]:
    """What `path` is, in words, and its entries: {'run': ...} for a run,
    {variant: ...} for a sweep."""
    where = Path(path)
    try:
        if (where / "sweep.json").is_file():
            from optima.sweep import Sweep

            entries: dict[str, Entry] = {}
            jobs = Sweep.load(where).jobs()
            for j in jobs:
                if j.status == "done":
                    entries.setdefault(j.variant, Entry()).add_run(j.run_dir)
            done = sum(e.runs for e in entries.values())
            if not done:
                raise ConfigError(f"{path}: a sweep with no finished run yet; nothing to compare")
            return f"sweep, {len(entries)} variants, {done} of {len(jobs)} runs finished", entries
        if (where / "metrics.json").is_file():
            entry = Entry()
            entry.add_run(where)
            return "run", {"run": entry}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if (where / "config.gin").is_file():
        raise ConfigError(f"{path}: a run that has not finished (no metrics.json); finish it with "
                          f"{program()} run CONFIG.gin --resume {path}, then compare")
    raise ConfigError(f"{path}: neither a finished run directory (metrics.json) nor a sweep directory "
                      "(sweep.json)")


def _median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def _share(entry: Entry | None, stage: str, arm: str) -> float | None:
    if entry is None or stage not in entry.plays:
        return None
    counts = entry.plays[stage]
    return 100.0 * counts[arm] / sum(counts.values())


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:.1f}%" if percent else f"{value:.4f}"


def _diff(a: float | None, b: float | None, percent: bool = False) -> str:
    if a is None or b is None:
        return ""
    return f"{b - a:+.1f}" if percent else f"{b - a:+.4f}"


def pairs(a: dict[str, Entry], b: dict[str, Entry]) -> list[tuple[str, Entry | None, Entry | None]]:
    """(name, A's entry, B's entry): a run against each variant; sweeps by variant name."""
    if len(a) == 1 and "run" in a:
        return [(name if name != "run" else "", a["run"], e) for name, e in b.items()]
    if len(b) == 1 and "run" in b:
        return [(name, e, b["run"]) for name, e in a.items()]
    return [(name, a.get(name), b.get(name)) for name in dict.fromkeys([*a, *b])]


def table(path_a: str, path_b: str) -> list[str]:
    """The comparison as lines of at most `WIDTH` characters."""
    kind_a, a = load(path_a)
    kind_b, b = load(path_b)
    label = WIDTH - 3 * (VALUE + 1)
    # a path is never cut (it names a directory); it has its own line
    lines = [f"A: {kind_a}", f"   {path_a}", f"B: {kind_b}", f"   {path_b}"]
    if "sweep" in kind_a or "sweep" in kind_b:
        lines.append("Sweeps: a metric is the median over a variant's seeds; plays pooled over runs.")
    header = f"{'':<{label}} {'A':>{VALUE}} {'B':>{VALUE}} {'B - A':>{VALUE}}"
    for name, ea, eb in pairs(a, b):
        lines += ["", _cut(f"{name}" if name else "metrics and arm shares", WIDTH), header]
        metrics = list(dict.fromkeys([*(ea.metrics if ea else {}), *(eb.metrics if eb else {})]))
        for m in metrics:
            va, vb = _median(ea.metrics.get(m)) if ea else None, _median(eb.metrics.get(m)) if eb else None
            lines.append(f"{_cut('  ' + m, label):<{label}} {_fmt(va):>{VALUE}} {_fmt(vb):>{VALUE}} "
                         f"{_diff(va, vb):>{VALUE}}")
        stages = list(dict.fromkeys([*(ea.plays if ea else {}), *(eb.plays if eb else {})]))
        for stage in stages:
            arms = dict.fromkeys([*(ea.arms.get(stage, []) if ea else []), *(eb.arms.get(stage, []) if eb else [])])
            for arm in (a for a in arms if (_share(ea, stage, a) or 0) + (_share(eb, stage, a) or 0) > 0):
                sa, sb = _share(ea, stage, arm), _share(eb, stage, arm)
                lines.append(f"{_cut(f'  {stage} plays: {arm}', label):<{label}} {_fmt(sa, True):>{VALUE}} "
                             f"{_fmt(sb, True):>{VALUE}} {_diff(sa, sb, True):>{VALUE}}")
    return lines


def compare_command(path_a: str, path_b: str) -> None:
    for line in table(path_a, path_b):
        typer.echo(line)
