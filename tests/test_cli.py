"""The CLI through Typer's test runner: one-line errors and their exit codes."""
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from optima.cli.main import app

runner = CliRunner()
QUICK = "tests/gin/tiny_ve.gin"


def _run(*args):
    result = runner.invoke(app, ["run", *args])
    return result.exit_code, result.output.strip()


def _one_line_error(output: str) -> str:
    lines = [l for l in output.splitlines() if l.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


@pytest.mark.parametrize("command", [[], ["run"], ["export"], ["eval"]])
def test_help_does_not_import_torch(command):
    code = ("import sys; from optima.cli.main import app; from typer.testing import CliRunner; "
            f"r = CliRunner().invoke(app, {command + ['--help']!r}); assert r.exit_code == 0, r.output; "
            "assert 'Usage' in r.output; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_configurable_names_the_nearest(tmp_path):
    code, out = _run(QUICK, "-b", "distillation.reward = @kd_rewrd()", "--run-dir", str(tmp_path / "r"))
    line = _one_line_error(out)
    assert code == 2
    assert "unknown configurable 'kd_rewrd'" in line and "kd_reward" in line


def test_unknown_configurable_in_a_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text(f"include '{QUICK}'\n\ndistillation.policy = @optima_polcy\n")
    code, out = _run(str(bad), "--run-dir", str(tmp_path / "r"))
    line = _one_line_error(out)
    assert code == 2
    assert f"{bad}:3" in line and "optima_policy" in line


def test_missing_required_binding_is_named(tmp_path):
    bad = tmp_path / "missing.gin"
    text = open(QUICK).read().replace("distillation.rounds = 40", "")
    bad.write_text(text.replace("include 'common/tiny_coca.gin'", "include 'gin/common/tiny_coca.gin'"))
    code, out = _run(str(bad), "--run-dir", str(tmp_path / "r"), "-b", "teacher_training.steps = 1",
                     "-b", "synthetic_ve_task.train_size = 64", "-b", "synthetic_ve_task.test_size = 8")
    line = _one_line_error(out.splitlines()[-1])
    assert code == 2
    assert "distillation.rounds" in line and "missing required binding" in line


def test_unknown_module_in_an_arm_names_the_valid_modules(tmp_path):
    code, out = _run(QUICK, "--run-dir", str(tmp_path / "r"), "-b", "distillation.arms = [['image'], ['audio']]",
                     "-b", "teacher_training.steps = 1", "-b", "synthetic_ve_task.train_size = 64",
                     "-b", "synthetic_ve_task.test_size = 8")
    line = out.splitlines()[-1]
    assert code == 2
    assert "'audio'" in line and "valid modules: image, text, multimodal" in line


def test_gin_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "syntax.gin"
    bad.write_text("experiment.seed = 1\nexperiment.seed = = 2\n")
    code, out = _run(str(bad), "--run-dir", str(tmp_path / "r"))
    line = _one_line_error(out)
    assert code == 2
    assert f"{bad}:2" in line and "syntax error" in line


def test_malformed_binding_shows_the_expected_form(tmp_path):
    code, out = _run(QUICK, "-b", "distillation.rounds", "--run-dir", str(tmp_path / "r"))
    assert code == 2
    assert "configurable.parameter = value" in _one_line_error(out)


def test_missing_config_file(tmp_path):
    code, out = _run(str(tmp_path / "nope.gin"))
    assert code == 2
    assert "nope.gin: no such gin file" in _one_line_error(out)


def test_an_existing_run_directory_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "student.safetensors").write_bytes(b"precious")
    code, out = _run(QUICK, "--run-dir", str(run_dir))
    assert code == 2 and "already holds files" in _one_line_error(out)
    assert (run_dir / "student.safetensors").read_bytes() == b"precious"


def test_debug_variable_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMA_DEBUG", "1")
    result = runner.invoke(app, ["run", str(tmp_path / "nope.gin")])
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "ConfigError"
