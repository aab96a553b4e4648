"""bench/synthetic_table.py, the evidence table's driver: what it keeps of a sweep
(results with relative run directories, figures, the fixed arms' reward noise per
round length) and the summary page it writes, on a tiny sweep of two fixed arms."""
from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from conftest import ROOT, TINY
from optima.cli.main import app

spec = importlib.util.spec_from_file_location("synthetic_table", ROOT / "bench" / "synthetic_table.py")
table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table)


def test_a_piece_is_kept_with_its_reward_noise_and_summarised(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMA_CACHE", str(tmp_path / "cache"))
    sweep = tmp_path / "sweeps" / "ve_tiny6"
    variants = tmp_path / "variants.toml"
    variants.write_text('[fixed-image]\nbindings = ["distillation.policy = @fixed_policy", "fixed_policy.arm = 0"]\n\n'
                        '[fixed-text]\nbindings = ["distillation.policy = @fixed_policy", "fixed_policy.arm = 1"]\n')
    bindings = [x for b in TINY + ["distillation.rounds = 10"] for x in ("-b", b)]
    runner = CliRunner()
    result = runner.invoke(app, ["sweep", "tests/gin/tiny_ve.gin", *bindings, "--variants", str(variants),
                                 "--jobs", "2", "--sweep-dir", str(sweep)])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["report", str(sweep)]).exit_code == 0

    out = tmp_path / "results"
    meta = {"config": "tests/gin/tiny_ve.gin", "command": "optima sweep ...", "wall_s": 60.0, "started": "now", "load_average_before": [0.5, 0, 0],
            "load_average_after": [1.5, 0, 0], "machine": table.machine()}
    table.keep("ve_tiny6", sweep, meta, out=out)
    kept = out / "ve_tiny6"
    rows = (kept / "results.csv").read_text()
    assert str(tmp_path) not in rows and "fixed-image/seed-0" in rows  # run directories relative to the sweep
    assert (kept / "figures" / "student-accuracy-per-variant.png").exists()
    noise = json.loads((kept / "reward_noise.json").read_text())["round_lengths"]
    # 20 steps: rounds of 5 steps give 4 rounds (3 rewards) per arm; rounds of 10 give 1 reward, too few
    assert list(noise) == ["5"] and noise["5"]["rounds"] == 4 and set(noise["5"]["arms"]) == {"image", "text"}
    # the rewards recomputed for T = 2 are the ones the runs played with
    run = sweep / "fixed-image" / "seed-0"
    played = json.loads((run / "metrics.json").read_text())["stages"]["student"]["rewards"][1:]
    recomputed = table.rewards_for(table.step_losses(run, "student"), 2)
    assert recomputed == pytest.approx(played, abs=1e-6)

    # --report-only: results.md and the metric figures again from the kept results.csv alone
    (kept / "figures" / "student-accuracy-per-variant.png").unlink()
    written = table.report_piece(kept)
    assert {p.name for p in written} == {"student-accuracy-per-variant.png", "student-accuracy-paired.png"}
    md = (kept / "results.md").read_text()
    assert "| vs fixed-image |" in md and "(1 seed: no interval)" in md  # no layerwise: the first variant
    assert "`distillation.policy = @fixed_policy`; `fixed_policy.arm = 1`" in md

    table.write_readme(out)
    readme = (out / "README.md").read_text()
    assert "| variant | ve_tiny6 (student/accuracy) |" in readme
    assert "| fixed-image | " in readme and "| fixed-text | " in readme and "| teacher | " in readme
    assert "`optima sweep ...` | 1.0 min | 0.5 / 1.5 |" in readme
    assert f"| all 1 of {len(table.PLAN)} pieces | | 1.0 min |" in readme  # the whole table's time


def test_every_variant_name_of_the_results_page_is_defined_there(tmp_path):
    """results/synthetic/README.md defines each variant name its tables use (its
    "Variants" table, written by the script from the kept results.csv files)."""
    import shutil

    readme = (table.OUT / "README.md").read_text()
    tables, rest = readme.split("## Variants", 1)
    glossary = rest.split("## How each piece was made", 1)[0]

    def rows(text):
        return [[cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines()
                if line.startswith("| ") and not line.startswith(("| variant", "| piece"))]

    used = {row[0] for row in rows(tables)}
    defined = {row[0]: row[1] for row in rows(glossary)}
    assert used and used <= set(defined), sorted(used - set(defined))
    assert all(defined[name] for name in used), [name for name in used if not defined[name]]
    # the committed page is the script's: rewriting it from the kept results changes nothing
    copy = tmp_path / "synthetic"
    shutil.copytree(table.OUT, copy)
    table.write_readme(copy)
    assert (copy / "README.md").read_text() == readme


def test_task_aware_candidates_are_paired_seed_by_seed_and_judged_against_the_goal(tmp_path):
    """The goal's verdict from hand-made results: a candidate above layerwise and the task
    alone on 4 of 5 seeds of every piece, and near the best fixed arm, meets it; one that
    is above on average but on 3 seeds only does not."""
    out = tmp_path / "results"
    base = {"layerwise": [0.70, 0.71, 0.72, 0.73, 0.74], "task-only": [0.69, 0.70, 0.71, 0.72, 0.73],
            "fixed-image": [0.72, 0.73, 0.74, 0.75, 0.76],
            "good": [0.71, 0.72, 0.73, 0.74, 0.69],       # above both on seeds 0-3, below on average
            "lucky": [0.80, 0.70, 0.71, 0.74, 0.75]}      # mean above, but above layerwise on 3 seeds
    header = "variant,seed,status,teacher/accuracy,tiny6/accuracy,wall_s,run_dir,error\n"
    pieces = []
    for piece, _, variants in table.PLAN:
        if variants.endswith("task_aware.toml"):
            pieces.append(piece)
            (out / piece).mkdir(parents=True)
            rows = [f"{v},{s},done,0.8,{x},1.0,{v}/seed-{s}," for v, xs in base.items() for s, x in enumerate(xs)]
            (out / piece / "results.csv").write_text(header + "\n".join(rows) + "\n")
    assert table.paired(list(__import__("csv").DictReader(open(out / pieces[0] / "results.csv"))), "tiny6/accuracy",
                        "lucky", "layerwise") == (pytest.approx(0.02), 3, 5)
    text = "\n".join(table.task_aware_section(out, pieces))
    assert "| good | 0.7200 ± 0.0192 (5) | -0.0020 (4/5) |" in text  # 4 of 5 seeds, but the mean is below
    assert "- good: not met" in text and "- lucky: not met" in text
    base["good"] = [0.71, 0.72, 0.73, 0.74, 0.745]
    for piece in pieces:
        rows = [f"{v},{s},done,0.8,{x},1.0,{v}/seed-{s}," for v, xs in base.items() for s, x in enumerate(xs)]
        (out / piece / "results.csv").write_text(header + "\n".join(rows) + "\n")
    text = "\n".join(table.task_aware_section(out, pieces))
    assert "- good: met (above both on 3 of 3 pieces, near the best fixed arm on 3)" in text


def test_the_summary_takes_pieces_with_and_without_the_reward_ablation(tmp_path):
    """A piece run before the reward-ablation rows existed has no reward-* runs:
    its cells stay blank, the paired tables still pair what it has."""
    header = "variant,seed,status,distillation.policy,distillation.reward,teacher/accuracy,tiny6/accuracy,wall_s,run_dir,error\n"
    old = "".join(f"{v},{s},done,{p},,0.75,{x + 0.001 * s},1.0,{v}/seed-{s},\n" for v, p, x in
                  [("layerwise", "@layerwise_policy", 0.70), ("task-only", "@layerwise_policy", 0.69)] for s in range(3))
    new = old + "".join(f"reward-kd,{s},done,,@kd_reward(),0.75,{0.72 + 0.001 * s},1.0,reward-kd/seed-{s},\n"
                        for s in range(3))
    meta = {"config": "gin/synthetic/ve_tiny6.gin", "command": "optima sweep ...", "wall_s": 60.0, "started": "now",
            "load_average_before": [1.0], "load_average_after": [1.0], "machine": table.machine()}
    for piece, rows in (("ve_tiny6", old), ("ve_tiny12", new)):
        (tmp_path / piece).mkdir()
        (tmp_path / piece / "results.csv").write_text(header + rows)
        (tmp_path / piece / "meta.json").write_text(json.dumps(meta))
    table.write_readme(tmp_path)
    readme = (tmp_path / "README.md").read_text()
    assert "| reward-kd |  | 0.7210 ± 0.0010 (3) |" in readme  # ve_tiny6 comes first in the plan
    assert "| reward-kd |  | +0.0200 better |" in readme  # against layerwise, seed by seed
    assert "| task-only | -0.0100 worse | -0.0100 worse |" in readme


def test_more_sweeps_are_added_to_a_kept_piece_and_a_run_it_has_is_refused(tmp_path):
    """--add: a later sweep's runs join a kept piece under the variants file's names,
    a key only they bind goes with the bound keys, the note says how they were made;
    a run the piece has already is skipped when the same (the stage cache's), refused
    when not, and then nothing is written."""
    out, sweeps = tmp_path / "results", tmp_path / "sweeps"
    kept = out / "ve_tiny6-long-task-aware"
    (kept / "figures").mkdir(parents=True)
    header = "variant,seed,status,distillation.policy,teacher/accuracy,tiny6/accuracy,wall_s,run_dir,error\n"
    (kept / "results.csv").write_text(header + "layerwise,0,done,@layerwise_policy,0.8,0.73,1.0,lw/layerwise/seed-0,\n")
    (kept / "meta.json").write_text(json.dumps({"note": "made by one sweep"}))
    probe = sweeps / "probe"
    (probe / "figures").mkdir(parents=True)
    (probe / "figures" / "tiny6-arm-plays.png").write_bytes(b"png")
    (probe / "results.csv").write_text(
        "variant,seed,status,distillation.policy,fixed_policy.arm,teacher/accuracy,tiny6/accuracy,wall_s,run_dir,error\n"
        f"fixed-image+text,1,done,@fixed_policy,3,0.8,0.74,2.0,{probe}/fixed-image+text/seed-1,\n"
        f"layerwise,0,done,@layerwise_policy,,0.8,0.73,0.1,{probe}/layerwise/seed-0,\n")

    added = table.add_sweeps(kept.name, [probe], "`optima sweep ... --sweep-dir SWEEPS/probe`",
                             {"fixed-image+text": "encoders"}, out=out)
    assert added == 1
    lines = (kept / "results.csv").read_text().splitlines()
    assert lines[0] == ("variant,seed,status,distillation.policy,fixed_policy.arm,teacher/accuracy,tiny6/accuracy,"
                        "wall_s,run_dir,error")
    assert lines[1] == "layerwise,0,done,@layerwise_policy,,0.8,0.73,1.0,lw/layerwise/seed-0,"
    assert lines[2] == "encoders,1,done,@fixed_policy,3,0.8,0.74,2.0,probe/fixed-image+text/seed-1,"
    assert (kept / "figures" / "probe-tiny6-arm-plays.png").exists()
    assert json.loads((kept / "meta.json").read_text())["note"] == \
        "made by one sweep; `optima sweep ... --sweep-dir SWEEPS/probe`"

    assert len(lines) == 3  # layerwise seed 0 was there with the same metrics
    before = (kept / "results.csv").read_text()
    csv_text = (probe / "results.csv").read_text()
    (probe / "results.csv").write_text(csv_text.replace("0.74,2.0", "0.75,2.0"))
    with pytest.raises(SystemExit, match="encoders seed 1 is in .*results.csv already, with other metrics"):
        table.add_sweeps(kept.name, [probe], "again", {"fixed-image+text": "encoders"}, out=out)
    assert (kept / "results.csv").read_text() == before
    with pytest.raises(SystemExit, match="nowhere/results.csv: not found"):
        table.add_sweeps(kept.name, [tmp_path / "nowhere"], "again", {}, out=out)
