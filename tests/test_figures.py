"""Figures: every `optima run` ends by writing its figures (PNG and TensorBoard
images) from its per-round log; `optima report` writes them again; a run that
reuses a cached stage has its rounds too; the figure functions on any number
of arms. (`optima report` of a sweep: tests/test_sweep.py.)"""
from __future__ import annotations

import json

import math

import matplotlib.image
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from optima.cli.main import app
from optima.figures import (RoundLogData, arm_plays_figure, arm_posterior_figure, run_figures, stage_figures,
                            variant_metric_figure)
from optima.reporting import read_round_log

from conftest import TINY


def _run(run_dir, *extra):
    args = ["run", "tests/gin/tiny_ve.gin", "--run-dir", str(run_dir)]
    for b in [*TINY, "distillation.rounds = 9", *extra]:
        args += ["-b", b]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def _images(tensorboard_run):
    events = EventAccumulator(str(tensorboard_run), size_guidance={"images": 0})
    events.Reload()
    return {tag: events.Images(tag) for tag in events.Tags()["images"]}


def test_a_run_writes_its_figures_and_report_rewrites_them(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMA_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    _run(run)
    arms, rounds = read_round_log(run / "rounds" / "student.jsonl")
    summary = json.loads((run / "metrics.json").read_text())
    assert arms == summary["stages"]["student"]["arms"] and len(arms) == 7
    assert [r["arm"] for r in rounds] == summary["stages"]["student"]["plays"]
    assert [r["reward"] for r in rounds] == summary["stages"]["student"]["rewards"]
    assert [r["step"] for r in rounds] == list(range(2, 19, 2))
    assert all(len(r["policy"]["mean"]) == 7 and sum(r["plays"]["count"]) == r["round"] for r in rounds)
    names = {"student-arm-posterior", "student-arm-plays"}
    assert {p.stem for p in (run / "figures").glob("*.png")} == names
    for name in names:
        height, width, _ = matplotlib.image.imread(run / "figures" / f"{name}.png").shape
        assert height > 300 and width > 600  # dpi 150
    images = _images(run / "tensorboard" / "figures")
    assert set(images) == names and all(len(v) == 1 for v in images.values())
    # labelled with the run's policy and reward; the warm-up shaded: optima_policy.warmup_rounds = 7
    # updates, the first round having no reward, so rounds 1-8 were played from the warm-up order
    posterior = run_figures(run)["student-arm-posterior"]
    assert "optima_policy" in posterior.get_suptitle() and "combined_reward" in posterior.axes[0].get_ylabel()
    assert posterior.axes[0].get_legend_handles_labels()[1][0] == "warm-up (rounds 1-8)"
    assert [r["policy"]["warmup"] for r in rounds] == [1.0] * 7 + [0.0] * 2

    # optima report rewrites them; TensorBoard still shows each figure once
    (run / "figures" / "student-arm-plays.png").unlink()
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "figures" / "student-arm-plays.png").exists()
    images = _images(run / "tensorboard" / "figures")
    assert set(images) == names and all(len(v) == 1 for v in images.values())

    # a run that reuses the cached student stage gets its rounds, and figures, too
    out = _run(tmp_path / "again")
    assert "student: reusing" in out
    assert (tmp_path / "again" / "rounds" / "student.jsonl").read_text() == \
        (run / "rounds" / "student.jsonl").read_text()
    assert {p.stem for p in (tmp_path / "again" / "figures").glob("*.png")} == names


def test_report_refuses_what_is_not_a_run_or_sweep(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "neither a run directory (config.gin) nor a sweep directory (sweep.json)" in result.output


def _log(arms, plays, with_mean=True):
    rounds = []
    for k, arm in enumerate(plays):
        count = [plays[:k + 1].count(a) for a in range(len(arms))]
        policy = {"mean": [0.1 * a if c else 0.0 for a, c in enumerate(count)], "count": count} if with_mean else {}
        rounds.append({"round": k + 1, "step": 2 * (k + 1), "arm": arm, "policy": policy,
                       "plays": {"count": count, "entropy": 0.0}})
    return RoundLogData(list(arms), rounds)


def test_figures_take_any_number_of_arms_and_say_what_they_show():
    arms = [f"m{i}" for i in range(25)] + ["m0+m1"]
    plays = [k % len(arms) for k in range(60)]
    posterior = arm_posterior_figure([_log(arms, plays), _log(arms, plays[::-1])], "optima")
    labels = posterior.axes[0].get_legend_handles_labels()[1]
    # each arm with the plays its estimate rests on (two runs of 60 rounds over 26 arms)
    assert labels[-1] == "m0 + m1 (4 plays)" and labels[0] == "m0 (6 plays)" and len(labels) == 26
    assert "mean over 2 runs" in posterior.axes[0].get_title()
    assert len({line.get_color() for line in posterior.axes[0].get_lines()[:26]}) == 26  # each arm its colour
    plays_fig = arm_plays_figure([_log(arms, plays)], "random", bins=10)
    ax = plays_fig.axes[0]
    assert ax.get_xlabel() == "round" and ax.get_ylabel() == "share of plays (%)"
    # bins of 6 rounds on the round axis (round k spans k +- 0.5), integer ticks
    assert [(p.get_x(), p.get_width()) for p in ax.containers[0]][:2] == [(0.5, pytest.approx(5.4)),
                                                                        (6.5, pytest.approx(5.4))]
    assert all(float(t).is_integer() for t in ax.get_xticks())
    heights = [sum(p.get_height() for p in container) for container in ax.containers]
    assert abs(sum(heights) - 100 * 10) < 1e-6  # every bin stacks to 100%
    # a policy without a posterior (fixed, layerwise, random) has no Figure 5
    assert arm_posterior_figure([_log(arms, plays, with_mean=False)], "random") is None


def test_finer_arms_are_drawn_by_unit():
    """63 arms over 6 layer groups cannot be told apart one by one: the figures
    show each unit's estimated effect and how often it was distilled."""
    import itertools

    units = ["image.1", "image.2", "text.1", "text.2", "multimodal.1", "multimodal.2"]
    arms = ["+".join(c) for k in range(1, 7) for c in itertools.combinations(units, k)]
    plays = [k % len(arms) for k in range(40)]
    data = _log(arms, plays)
    for k, record in enumerate(data.rounds):
        record["policy"]["unit_effect"] = [0.01 * (u + 1) for u in range(6)]
    data.units = units
    figures = stage_figures([data], "finer", "student")
    assert set(figures) == {"student-unit-effect", "student-unit-plays"}
    effect = figures["student-unit-effect"].axes[0]
    assert effect.get_legend_handles_labels()[1] == units
    assert list(effect.get_lines()[5].get_ydata()) == [0.06] * 40
    plays_ax = figures["student-unit-plays"].axes[0]
    # rounds 1-4 played arms 0-3, the single units image.1 .. text.2: each distilled in 1 of those 4 rounds
    assert plays_ax.get_lines()[0].get_ydata()[0] == 25.0 and plays_ax.get_lines()[4].get_ydata()[0] == 0.0
    # the module arms of the paper stay drawn arm by arm
    module = _log(["image", "text", "image+text"], [0, 1, 2, 0])
    module.units = ["image", "text"]
    assert set(stage_figures([module], "paper", "student")) == {"student-arm-posterior", "student-arm-plays"}


def test_variant_figure_marks_reference_seeds_and_teacher():
    fig = variant_metric_figure({"optima": [0.9], "layerwise": [0.91, 0.95], "kd": []}, "accuracy",
                                reference="optima", teacher=[0.93, 0.95])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["layerwise (n=2)", "optima (n=1)"]  # top to bottom
    assert ax.get_yticklabels()[1].get_color() == "tab:red"  # the reference
    legend = ax.get_legend_handles_labels()[1]
    assert sorted(legend) == ["median over seeds", "optima: the reference variant", "single seed",
                              "teacher (median 0.94 of 2 seeds)", "±1 std over seeds"]
    assert ax.get_xlabel() == "test accuracy"
    assert variant_metric_figure({"kd": []}, "accuracy") is None


def test_figures_tolerate_missing_values_and_name_the_policy(tmp_path):
    """A plugin policy whose diagnostics hold NaN (logged as null) still gets its
    figures; a log a figure cannot use costs one warning line per figure, and
    `optima report` ends normally. Labels name the run's policy and reward."""
    run = tmp_path / "run"
    (run / "rounds").mkdir(parents=True)
    (run / "config.gin").write_text("")
    (run / "operative_config.gin").write_text("student/distillation.policy = @nan_policy\n"
                                              "student/distillation.reward = @kd_reward()\n")
    arms = ["image", "text", "image+text"]
    lines = [{"arms": arms, "units": ["image", "text"]}]
    for k, arm in enumerate([0, 1, 2, 2, 1, 2]):
        lines.append({"round": k + 1, "step": 2 * (k + 1), "arm": arm, "reward": None if k == 0 else 0.1,
                      "plays": {"count": [1, 1, 1], "entropy": 0.0},
                      # an arm's mean before its first reward is NaN, written as null
                      "policy": {"mean": [0.1, None, None if k < 3 else 0.2], "sd": [None, 0.01, 0.02],
                                 "warmup": 1.0 if k < 2 else 0.0}})
    (run / "rounds" / "student.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    # a log whose rounds lack the played arm: neither figure can be drawn from it
    broken = [lines[0]] + [{k: v for k, v in x.items() if k != "arm"} for x in lines[1:]]
    (run / "rounds" / "broken.jsonl").write_text("".join(json.dumps(x) + "\n" for x in broken))

    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert {p.stem for p in (run / "figures").glob("*.png")} == {"student-arm-posterior", "student-arm-plays"}
    warnings = [ln for ln in result.output.splitlines() if ln.startswith("optima: warning:")]
    assert len(warnings) == 2 and all("figure broken-arm-" in w and "KeyError" in w for w in warnings), warnings

    figures = run_figures(run, warn=lambda line: None)
    posterior = figures["student-arm-posterior"]
    title = posterior.get_suptitle()
    assert "nan_policy" in title and "Thompson" not in title
    ax = posterior.axes[0]
    assert "kd_reward" in ax.get_ylabel() and "built-in" not in ax.get_ylabel()
    labels = ax.get_legend_handles_labels()[1]
    assert labels[0] == "warm-up (rounds 1-3)"  # warmup 1 after rounds 1-2: rounds 1-3 came from its order
    assert labels[1:] == ["image (1 play)", "text (2 plays)", "image + text (3 plays)"]
    text_line = ax.get_lines()[1]
    assert all(math.isnan(y) for y in text_line.get_ydata())  # null throughout: a gap, not a zero
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert "nan_policy" in figures["student-arm-plays"].get_suptitle()
