"""`optima compare A B`: two runs or sweeps side by side (metrics, arm shares),
within 80 columns; one-line errors for what is neither."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from optima.cli.main import app

ARMS = ["image", "text", "image+text"]


def _run(run_dir, accuracy, plays, teacher=0.8):
    run_dir.mkdir(parents=True)
    (run_dir / "config.gin").write_text("")
    (run_dir / "metrics.json").write_text(json.dumps({
        "metrics": {"teacher": {"accuracy": teacher}, "tiny6": {"accuracy": accuracy}},
        "stages": {"teacher": {"key": "t"}, "tiny6": {"arms": ARMS, "plays": plays}}}))


def _sweep(sweep_dir, variants):
    """A sweep directory as `optima sweep` leaves it: sweep.json and finished runs."""
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "sweep.json").write_text(json.dumps({
        "config": "x.gin", "bindings": [],
        "variants": [{"name": v, "bindings": [], "seeds": list(range(len(runs)))} for v, runs in variants.items()]}))
    for v, runs in variants.items():
        for seed, (accuracy, plays) in enumerate(runs):
            _run(sweep_dir / v / f"seed-{seed}", accuracy, plays)


def _compare(a, b):
    result = CliRunner().invoke(app, ["compare", str(a), str(b)])
    return result.exit_code, result.output


def test_two_runs_side_by_side(tmp_path):
    _run(tmp_path / "a", 0.70, [0, 0, 1, 2])
    _run(tmp_path / "b", 0.75, [2, 2, 2, 2])
    code, out = _compare(tmp_path / "a", tmp_path / "b")
    assert code == 0, out
    rows = {line.split()[0] if "plays" not in line else line.split(":")[1].split()[0]: line.split()[-3:]
            for line in out.splitlines() if line.startswith("  ")}
    assert rows["tiny6/accuracy"] == ["0.7000", "0.7500", "+0.0500"]
    assert rows["teacher/accuracy"] == ["0.8000", "0.8000", "+0.0000"]
    assert rows["image"] == ["50.0%", "0.0%", "-50.0"] and rows["image+text"] == ["25.0%", "100.0%", "+75.0"]
    assert out.splitlines()[:2] == ["A: run", f"   {tmp_path / 'a'}"]
    assert max(len(line) for line in out.splitlines()[4:]) <= 80


def test_two_sweeps_variant_by_variant_within_80_columns(tmp_path):
    long = "a-variant-with-a-name-much-longer-than-eighty-columns-" * 2
    _sweep(tmp_path / "s1", {"optima": [(0.70, [0, 1]), (0.72, [0, 0]), (0.90, [1, 1])], long: [(0.6, [2])]})
    _sweep(tmp_path / "s2", {"optima": [(0.71, [2, 2]), (0.74, [2, 2])], "layerwise": [(0.8, [2])]})
    code, out = _compare(tmp_path / "s1", tmp_path / "s2")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[:2] == ["A: sweep, 2 variants, 4 of 4 runs finished", f"   {tmp_path / 's1'}"]
    assert max(len(line) for line in lines[4:]) <= 80  # the paths on their own lines, never cut
    start = lines.index("optima") + 1
    optima = lines[start:lines.index("", start)]
    # medians over seeds: 0.72 (of 0.70, 0.72, 0.90) and 0.725 (of 0.71, 0.74)
    assert optima[2].split()[-4:] == ["tiny6/accuracy", "0.7200", "0.7250", "+0.0050"]
    # plays pooled over runs: image 3 of 6, text 3 of 6 in s1; image+text 4 of 4 in s2
    shares = {line.split(":")[1].split()[0]: line.split()[-3:] for line in optima if "plays:" in line}
    assert shares["image"] == ["50.0%", "0.0%", "-50.0"] and shares["image+text"] == ["0.0%", "100.0%", "+100.0"]
    # a variant only one sweep has: blank on the other side
    layerwise = lines[lines.index("layerwise") + 2]
    assert layerwise.split() == ["teacher/accuracy", "0.8000"]
    assert any(line.startswith("a-variant-with") and line.endswith("…") for line in lines)


def test_what_is_neither_a_finished_run_nor_a_sweep(tmp_path):
    _run(tmp_path / "a", 0.7, [0])
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.gin").write_text("")
    code, out = _compare(tmp_path / "a", tmp_path / "unfinished")
    assert code == 2 and out.count("\n") == 1
    assert out.startswith(f"optima: error: {tmp_path / 'unfinished'}: a run that has not finished")
    code, out = _compare(tmp_path / "nothing", tmp_path / "a")
    assert code == 2 and out == (f"optima: error: {tmp_path / 'nothing'}: neither a finished run directory "
                                 "(metrics.json) nor a sweep directory (sweep.json)\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    code, out = _compare(tmp_path / "a", tmp_path / "broken")
    assert code == 2 and "broken: unreadable (JSONDecodeError" in out and out.count("\n") == 1
