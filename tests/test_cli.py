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


@pytest.mark.parametrize("command", [[], ["run"], ["export"], ["eval"], ["data", "synth"]])
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


def test_torch_threads_default_to_one_and_follow_the_option_binding_and_environment():
    """The shipped CPU configs run fastest on one thread (bench/results/thread_count.json);
    --threads, experiment.threads and OMP_NUM_THREADS choose another count."""
    import torch

    from conftest import TINY

    before = torch.get_num_threads()
    args = ["run", QUICK, "--dry-run", *(arg for b in TINY for arg in ("-b", b))]
    try:
        seen = {}
        for name, extra, env in (("default", [], {"OMP_NUM_THREADS": None}),
                                 ("option", ["--threads", "2"], {"OMP_NUM_THREADS": None}),
                                 ("binding", ["-b", "experiment.threads = 2"], {"OMP_NUM_THREADS": "1"}),
                                 ("environment", [], {"OMP_NUM_THREADS": "2"})):
            torch.set_num_threads(3)
            result = runner.invoke(app, [*args, *extra], env=env)
            assert result.exit_code == 0, result.output
            seen[name] = torch.get_num_threads()
        assert seen == {"default": 1, "option": 2, "binding": 2, "environment": 2}
        code, out = _run(*args[1:], "-b", "experiment.threads = 0")
        assert code == 2 and _one_line_error(out) == \
            "optima: error: experiment.threads = 0 must be an integer >= 1"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("on_path", [False, True])
def test_printed_commands_run_as_printed(on_path, monkeypatch):
    """After `make demo` the venv is not activated: the resume command a run
    prints must run in the user's shell as printed (its PATH without .venv/bin)."""
    import os
    import shlex
    from pathlib import Path

    from optima.cli.run import command_line
    from optima.program import program

    scripts = str(Path(sys.executable).parent)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != scripts]
    monkeypatch.setenv("PATH", os.pathsep.join([scripts, *path] if on_path else path))
    assert (program() == "optima") == on_path
    printed = command_line("tests/gin/tiny_ve.gin", ["distillation.rounds = 4"], "--help")
    done = subprocess.run(shlex.split(printed), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Usage" in done.stdout, (printed, done.stderr)


def test_every_folder_of_the_installed_packages_is_declared():
    """setuptools warns about (and may leave out) a folder Python can import that
    `packages` does not list, such as a data folder (optima/bandit_data)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    found = set()
    for package, folder in config["package-dir"].items():
        for path in [root / folder, *(p for p in (root / folder).rglob("*") if p.is_dir())]:
            if path.name != "__pycache__" and any(f.is_file() for f in path.iterdir()):
                found.add(".".join([package, *path.relative_to(root / folder).parts]))
    assert found <= declared, sorted(found - declared)
    assert config["package-data"]["optima.bandit_data"] == ["*.json"]
