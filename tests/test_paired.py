"""Paired comparisons (optima/paired.py) and what results.md and the sweep
figures make of them: seed-by-seed differences, a seeded bootstrap interval, the
verdict it gives; the teacher summarised over seeds, not runs."""
from __future__ import annotations

import math

import pytest

from optima import paired
from optima.figures import metric_figures
from optima.sweep import Job, Variant, results_markdown


def test_the_interval_of_two_differences_is_their_range():
    """Resampling two values gives means a, (a+b)/2, b with probabilities 1/4, 1/2,
    1/4: the 2.5% and 97.5% quantiles are a and b."""
    assert paired.bootstrap_interval([0.01, 0.05]) == pytest.approx((0.01, 0.05))
    assert paired.bootstrap_interval([0.02, 0.02, 0.02]) == pytest.approx((0.02, 0.02))
    # seeded: the same interval every time
    assert paired.bootstrap_interval([0.1, -0.3, 0.2, 0.05]) == paired.bootstrap_interval([0.1, -0.3, 0.2, 0.05])


def test_pairs_by_seed_and_decides_by_the_interval():
    ref = {0: 0.79, 1: 0.80, 2: 0.80, 3: 0.86, 4: 0.90}
    better = paired.paired_difference("a", {0: 0.80, 1: 0.82, 2: 0.85, 3: 0.90}, "ref", ref)
    assert better.seeds == (0, 1, 2, 3)  # seed 4 has no pair
    assert better.differences == pytest.approx((0.01, 0.02, 0.05, 0.04))
    assert better.mean == pytest.approx(0.03) and better.low > 0 and better.verdict == "better"
    assert better.cell().endswith("better (4 seeds)")
    # unpaired, the medians would differ by less than the spread; paired, every seed is lower
    worse = paired.paired_difference("b", {s: v - 0.01 for s, v in ref.items()}, "ref", ref)
    assert worse.verdict == "worse" and worse.high < 0
    tie = paired.paired_difference("c", {0: 0.80, 1: 0.79, 2: 0.81}, "ref", ref)
    assert tie.low < 0 < tie.high and tie.verdict == "tie"
    # a loss is better lower
    assert paired.paired_difference("d", {0: 1.0, 1: 1.1}, "ref", {0: 1.2, 1: 1.3}, higher=False).verdict == "better"
    assert not paired.higher_is_better("val_loss") and paired.higher_is_better("cider")
    one = paired.paired_difference("e", {0: 0.9, 1: math.nan}, "ref", ref)
    assert one.n == 1 and one.verdict == "n < 2" and "no interval" in one.cell()
    assert paired.paired_difference("f", {7: 0.9}, "ref", ref) is None


def test_the_reference_is_layerwise_and_the_task_alone_the_second():
    assert paired.references(["optima", "layerwise", "task-only"]) == ["layerwise", "task-only"]
    assert paired.references(["optima", "T20"]) == ["optima"]  # no layerwise: the first variant


def _jobs(tmp_path):
    """Teachers per seed 1..5; optima has seeds 0-4, layerwise 0-4, fixed-image 0-2.
    Over runs the teacher's median would be 2.5 (seeds 0-2 counted twice), over seeds 3."""
    students = {"optima": [0.70, 0.71, 0.72, 0.73, 0.74], "layerwise": [0.69, 0.70, 0.70, 0.72, 0.73],
                "fixed-image": [0.80, 0.80, 0.80]}
    jobs = []
    for variant, values in students.items():
        for seed, value in enumerate(values):
            j = Job(variant, seed, (), (), tmp_path / variant / f"seed-{seed}", tmp_path / "log")
            j.status, j.metrics = "done", {"teacher/accuracy": float(seed + 1), "student/accuracy": value}
            jobs.append(j)
    return jobs, [Variant(v, (), tuple(range(len(xs)))) for v, xs in students.items()]


def test_results_markdown_pairs_variants_and_gives_the_teacher_once(tmp_path):
    from types import SimpleNamespace

    jobs, grid = _jobs(tmp_path)
    md = results_markdown(SimpleNamespace(config="x.gin", grid=grid, common=()), jobs)
    teacher = md.split("## teacher/accuracy")[1].split("## student/accuracy")[0]
    # one row over the 5 seeds: median 3, not per variant (fixed-image's 3 seeds made it 2 and a "difference")
    assert "| 0, 1, 2, 3, 4 | 3.0000 | 3.0000 | 1.5811 | 5 |" in teacher
    assert "fixed-image" not in teacher and "vs" not in teacher
    student = md.split("## student/accuracy")[1]
    assert "| variant | median | mean | std | n | vs layerwise |" in student  # layerwise, not the first variant
    # differences 0.01, 0.01, 0.02, 0.01, 0.01: a resample's mean is 0.01 + 0.002 K, K ~ Binomial(5, 0.2);
    # P(K = 0) = 0.33 and P(K <= 2) = 0.94 < 0.975 <= P(K <= 3) = 0.99: the interval is [0.010, 0.016]
    assert "| optima | 0.7200 | 0.7200 | 0.0158 | 5 | +0.0120 [+0.0100, +0.0160] better (5 seeds) |" in student
    assert "| fixed-image | 0.8000 |" in student and "better (3 seeds)" in student


def test_sweep_figures_draw_the_teacher_over_seeds_and_the_paired_differences(tmp_path):
    jobs, grid = _jobs(tmp_path)
    figures = metric_figures(jobs, [v.name for v in grid], "x")
    assert set(figures) == {"student-accuracy-per-variant", "student-accuracy-paired"}
    legend = figures["student-accuracy-per-variant"].axes[0].get_legend_handles_labels()[1]
    assert "teacher (median 3 of 5 seeds)" in legend and "layerwise: the reference variant" in legend
    ax = figures["student-accuracy-paired"].axes[0]
    assert ax.get_title() == "against layerwise"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["fixed-image (3 seeds)", "layerwise", "optima (5 seeds)"]
    # optima's interval is drawn from its low to its high end, in the colour of "better"
    bars = [line for line in ax.get_lines() if line.get_color() == "tab:green"]
    assert [list(b.get_xdata()) for b in bars] == [pytest.approx([0.010, 0.016]), pytest.approx([0.10, 0.11])]
