"""The example third-party packages in `examples/`: their components on their own
(imported from source), then installed with pip into a folder on the path, seen
by `optima plugins` and distilled through their gin files."""
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import gin
import numpy as np
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from typer.testing import CliRunner

from optima import config
from optima.cli.main import app
from optima.engine import Network
from optima.errors import ConfigError
from optima.plugins.heads.vl_heads import attentional_pooler_head
from optima.taps import Recorder

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
AUDIO, VIDEO = EXAMPLES / "optima-audio", EXAMPLES / "optima-video"

# Width 32, 1 layer per module: a forward pass in milliseconds.
ARCH = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 8,
                   "attentional_pool": True, "attn_pooler_queries": 8, "attn_pooler_heads": 4,
                   "output_tokens": True},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1,
                       "attn_pooler_heads": 4},
}


@pytest.fixture
def from_source(monkeypatch):
    """Import the examples' packages from their source folders."""
    for example in (AUDIO, VIDEO):
        monkeypatch.syspath_prepend(str(example / "src"))


def _recorded(model, batch):
    """Every layer's hidden state and attention maps after one forward pass."""
    recorder = Recorder(model.distill_modules())
    try:
        model(batch)
        return {key: (recorder.hidden(key), recorder.attention(key)) for key in recorder.keys()}
    finally:
        recorder.remove()


# -- optima-audio on its own ------------------------------------------------------

def test_log_mel_puts_each_pitch_in_a_higher_band(from_source):
    from optima_audio.model import LogMel, mel_filterbank
    from optima_audio.task import PITCH_HZ

    filters = mel_filterbank(129, 32, 8_000)
    assert filters.shape == (129, 32) and (filters >= 0).all()
    peaks = filters.argmax(dim=0)
    assert (peaks[1:] >= peaks[:-1]).all()  # filters ordered by frequency
    t = torch.arange(2_000) / 8_000
    mel = LogMel(8_000, 256, 128, 32)
    bands = [int(mel(torch.sin(2 * torch.pi * hz * t)[None]).mean(1).argmax()) for hz in PITCH_HZ]
    assert mel(t[None]).shape == (1, 16, 32)  # 1 + 2000 // 128 frames
    assert bands == sorted(bands) and len(set(bands)) == 3


def test_audio_model_has_four_modules_all_recorded(from_source):
    from optima_audio.model import MODULES, audio_coca_model
    from optima_audio.task import SyntheticAudioVisual

    model = audio_coca_model(ARCH, layers=(1, 1, 1, 2), sample_rate=8_000, n_fft=256, hop_length=128,
                             n_mels=32, max_frames=32)
    assert model.module_names() == MODULES == ("image", "text", "multimodal", "audio")
    task = SyntheticAudioVisual(sample_rate=8_000, train_size=6, val_size=0, test_size=0)
    batch = next(task.batches("train", 3, shuffle=False, seed=0))
    network = Network(model, attentional_pooler_head(model, task))
    assert network(batch).shape == (3, 10)
    recorded = _recorded(model, batch)
    hidden, (attn,) = recorded[("audio", 1)]
    assert hidden.shape == (3, 16, 32) and attn.shape == (3, 16, 16)
    # the decoder cross-attends to the image tokens and the 16 audio tokens
    image_tokens = model.coca.encode_image(batch["image"]).shape[1]
    _, (_, cross_attn) = recorded[("multimodal", 0)]
    assert cross_attn.shape[-1] == image_tokens + 16
    with pytest.raises(ConfigError, match="needs 4 counts"):
        audio_coca_model(ARCH, layers=(1, 1, 1))
    with torch.device("meta"):  # `optima run --dry-run` builds models there
        assert audio_coca_model(ARCH, layers=(1, 1, 1, 1)).module_names() == MODULES


def test_a_coca_extension_exports_its_coca_for_open_clip_and_its_own_weights_beside(from_source, tmp_path):
    """`CoCaExtension.export` (what `optima export` calls): open_clip's files for
    the CoCa, `extension.safetensors` for the audio module; `load_export` gives
    another instance every weight back, and plain open_clip loads the CoCa."""
    import open_clip
    from optima_audio.model import audio_coca_model

    sizes = dict(layers=(1, 1, 1, 1), sample_rate=8_000, n_fft=256, hop_length=128, n_mels=32, max_frames=32)
    torch.manual_seed(0)
    model = audio_coca_model(ARCH, **sizes)
    info = model.export(str(tmp_path), "audio-student")
    assert info["files"] == ["audio-student.json", "open_clip_model.safetensors", "open_clip_config.json",
                             "extension.safetensors"]
    assert info["extension"]["class"] == "optima_audio.model.AudioCoCaModel"
    torch.manual_seed(1)
    other = audio_coca_model(ARCH, **sizes)
    assert not all(torch.equal(a, b) for a, b in zip(other.audio.parameters(), model.audio.parameters()))
    other.load_export(str(tmp_path))
    restored = other.state_dict()
    assert all(torch.equal(v, restored[k]) for k, v in model.state_dict().items())
    open_clip.add_model_config(str(tmp_path))
    plain = open_clip.create_model("audio-student", pretrained=str(tmp_path / "open_clip_model.safetensors"))
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in model.coca.coca.state_dict().items())
    with pytest.raises(ConfigError, match="holds no extension.safetensors"):
        (tmp_path / "extension.safetensors").unlink()
        other.load_export(str(tmp_path))


def test_audio_task_answers_from_image_or_audio_and_is_reproducible(from_source):
    from optima_audio.task import ANSWERS, COLOURS, PITCH_HZ, PITCHES, SHAPES, SyntheticAudioVisual

    task = SyntheticAudioVisual(sample_rate=8_000, train_size=300, val_size=0, test_size=30)
    again = SyntheticAudioVisual(sample_rate=8_000, train_size=300, val_size=0, test_size=30)
    data, same = task.split("train"), again.split("train")
    assert all(torch.equal(data[k], same[k]) for k in data)
    assert not torch.equal(task.split("test")["image"], data["image"][:30])
    assert torch.bincount(data["question"]).tolist() == [100, 100, 100]
    assert task.num_outputs == len(ANSWERS) == 10
    # each answer is the asked property: colour, shape, or the tone's pitch
    spectrum = torch.fft.rfft(data["audio"]).abs().argmax(-1) * 8_000 / data["audio"].shape[1]
    heard = torch.tensor([min(range(3), key=lambda p: abs(PITCH_HZ[p] - f)) for f in spectrum.tolist()])
    assert torch.equal(heard, data["pitch"])
    assert {q for q, _ in task.questions("train")} == {"what colour is the shape?", "what shape is it?",
                                                       "how high is the sound?"}
    truth = torch.stack([data["colour"], len(COLOURS) + data["shape"], len(COLOURS) + len(SHAPES) + data["pitch"]])
    assert torch.equal(data["label"], truth[data["question"], torch.arange(300)])
    assert [a for _, a in task.questions("train")] == [ANSWERS[k] for k in data["label"]]
    assert {ANSWERS[k] for k in data["label"][data["question"] == 2]} == set(PITCHES)
    assert task.fingerprint() == again.fingerprint()


def test_epsilon_greedy_policy(from_source):
    from optima_audio.policy import EpsilonGreedyPolicy

    policy = EpsilonGreedyPolicy(num_arms=5, seed=3, epsilon=0.0)
    warmup = []
    for _ in range(5):
        arm = policy.select()
        assert policy.select() == arm  # the same arm until it is updated
        policy.update(arm, 0.9 if arm == 2 else 0.1)
        warmup.append(arm)
    assert sorted(warmup) == [0, 1, 2, 3, 4]
    assert [policy.select() for _ in range(3)] == [2, 2, 2]  # greedy with epsilon 0

    explorer = EpsilonGreedyPolicy(num_arms=5, seed=0, epsilon=0.5, step_size=0.5)
    for k in range(5):
        explorer.update(explorer.select(), float(k))
    clone = EpsilonGreedyPolicy(num_arms=5, seed=9)
    clone.load_state_dict(explorer.state_dict())
    plays = []
    for policy in (explorer, clone):
        arms = []
        for _ in range(20):
            arm = policy.select()
            policy.update(arm, 0.5)
            arms.append(arm)
        plays.append(arms)
    assert plays[0] == plays[1] and len(set(plays[0])) > 1
    with pytest.raises(ConfigError, match="epsilon"):
        EpsilonGreedyPolicy(num_arms=3, epsilon=1.5)
    with pytest.raises(ValueError, match="non-finite"):
        explorer.update(0, float("nan"))


# -- optima-video on its own ------------------------------------------------------

def test_video_model_attends_across_frames(from_source):
    from optima_video.model import MODULES, video_coca_model
    from optima_video.task import SyntheticMovingShapes

    model = video_coca_model(ARCH, layers=(1, 1, 1, 2))
    assert model.module_names() == MODULES == ("image", "text", "multimodal", "video")
    task = SyntheticMovingShapes(frames=4, train_size=6, val_size=0, test_size=0)
    batch = next(task.batches("train", 2, shuffle=False, seed=0))
    assert batch["video"].shape == (2, 4, 3, 32, 32) and torch.equal(batch["image"], batch["video"][:, 0])
    network = Network(model, attentional_pooler_head(model, task))
    assert network(batch).shape == (2, 7)
    hidden, (attn,) = _recorded(model, batch)[("video", 1)]
    tokens = hidden.shape[0] // 2  # one sequence over the 4 frames per image token
    assert hidden.shape == (2 * tokens, 4, 32) and attn.shape == (2 * tokens, 4, 4)


def test_moving_shapes_move_change_colour_and_answers_match(from_source):
    from optima_video.task import ANSWERS, COLOURS, SyntheticMovingShapes, _RGB

    task = SyntheticMovingShapes(frames=4, speed=3.0, train_size=60, val_size=0, test_size=0)
    rec = task.split("train")
    clips = task.render("train", np.arange(60))
    background = clips[:, :, :, :1, :1]
    mask = (clips - background).abs().sum(2) > 0.5  # (n, F, H, W)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    area = mask.sum((-2, -1)).float()
    cx, cy = (mask * xs).sum((-2, -1)) / area, (mask * ys).sum((-2, -1)) / area
    step = torch.stack([cx[:, -1] - cx[:, 0], cy[:, -1] - cy[:, 0]], -1) / 3  # px per frame
    expected = torch.tensor([[-3.0, 0], [3, 0], [0, -3], [0, 3]])[rec["direction"]]
    assert torch.allclose(step, expected, atol=0.75)
    # the shape's colour: the first one in frames 0-1, the other one in frames 2-3
    mean, std = torch.tensor(OPENAI_DATASET_MEAN), torch.tensor(OPENAI_DATASET_STD)
    shown = (clips.flatten(3) * mask.flatten(2)[:, :, None]).sum(-1) / area[..., None] * std + mean
    nearest = torch.cdist(shown.reshape(-1, 3), torch.from_numpy(_RGB)).argmin(-1).reshape(60, 4)
    assert nearest[:, :2].tolist() == [[c, c] for c in rec["colour"]]
    assert nearest[:, 2:].tolist() == [[c, c] for c in rec["colour_after"]]
    assert (rec["colour"] != rec["colour_after"]).all()
    assert task.num_outputs == len(ANSWERS) == 7
    truth = np.stack([rec["colour"], rec["colour_after"], len(COLOURS) + rec["shape"]])
    assert rec["label"].tolist() == truth[rec["question"], np.arange(60)].tolist()
    assert [a for _, a in task.questions("train")] == [ANSWERS[k] for k in rec["label"]]
    assert torch.equal(task.render("train", np.arange(5)), clips[:5])  # same record, same pixels


# -- their gin files, without installing -------------------------------------------

@pytest.mark.parametrize("gin_file", [AUDIO / "src" / "optima_audio" / "gin" / "audio_av.gin",
                                      VIDEO / "src" / "optima_video" / "gin" / "moving_shapes.gin"],
                         ids=lambda p: p.stem)
def test_example_gin_files_plan_fifteen_arms(from_source, gin_file):
    """The shipped settings, resolved and built on the meta device (`--dry-run`)."""
    import optima_audio.plugin
    import optima_video.plugin
    from optima.experiment import experiment

    config.setup(external_plugins=False, plugins=[("audio", optima_audio.plugin), ("video", optima_video.plugin)])
    try:
        config.parse([str(gin_file)])
        plan = experiment(None, dry_run=True)
    finally:
        config.setup(external_plugins=False)
    module = "audio" if AUDIO in gin_file.parents else "video"
    assert list(plan["models"]["student"]["modules"]) == ["image", "text", "multimodal", module]
    assert len(plan["stages"]["student"]["arms"]) == 2 ** 4 - 1


def test_the_examples_load_from_source_beside_what_an_editable_install_left(from_source, tmp_path, monkeypatch):
    """`pip install -e examples/optima-audio examples/optima-video` leaves
    `*.egg-info` in their `src/` (and `pip uninstall` leaves it there), so their
    entry points stay visible to importlib.metadata; with plugins disabled they
    must not keep the examples' own plugins, given by module, from loading."""
    for dist, name in (("optima_audio", "audio"), ("optima_video", "video")):
        egg = tmp_path / f"{dist}.egg-info"  # what setuptools writes there
        egg.mkdir()
        (egg / "PKG-INFO").write_text(f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: 0.1.0\n")
        (egg / "entry_points.txt").write_text(f"[optima]\n{name} = {dist}.plugin\n")
        (egg / "top_level.txt").write_text(f"{dist}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert {ep.name for ep in metadata.entry_points(group="optima")} >= {"audio", "video"}
    for gin_file in (AUDIO / "src" / "optima_audio" / "gin" / "audio_av.gin",
                     VIDEO / "src" / "optima_video" / "gin" / "moving_shapes.gin"):
        test_example_gin_files_plan_fifteen_arms(from_source, gin_file)


# -- installed with pip -------------------------------------------------------------

def _tutorial_package(folder: Path) -> Path:
    """The package docs/plugins.md walks a newcomer through, written from its text."""
    text = (ROOT / "docs" / "plugins.md").read_text()
    section = text[text.index("## Your first plugin package"):text.index("## The hooks")]
    package = folder / "optima-greedy"
    (package / "src" / "optima_greedy" / "gin").mkdir(parents=True)
    (package / "pyproject.toml").write_text(re.search(r"```toml\n(.*?)```", section, re.S).group(1))
    (package / "src" / "optima_greedy" / "__init__.py").write_text("")
    (package / "src" / "optima_greedy" / "plugin.py").write_text(
        re.search(r"```python\n(.*?)```", section, re.S).group(1))
    (package / "src" / "optima_greedy" / "gin" / "greedy.gin").write_text(
        re.search(r"```gin\n(.*?)```", section, re.S).group(1))
    return package


@pytest.fixture(scope="session")
def installed(tmp_path_factory):
    """Both examples and the docs' tutorial package pip-installed into one folder
    (copied first, so that the build leaves nothing in the repository); returns
    that folder."""
    base = tmp_path_factory.mktemp("examples")
    sources = [shutil.copytree(example, base / example.name,
                               ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
               for example in (AUDIO, VIDEO)] + [_tutorial_package(base)]
    target = base / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), *map(str, sources)], check=True,
                   env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    return target


@pytest.mark.slow
def test_installed_packages_are_listed_by_optima_plugins(installed):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")])}
    env.pop("OPTIMA_DISABLE_PLUGINS", None)
    out = subprocess.run([sys.executable, "-m", "optima.cli.main", "plugins", "--json"], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    plugins = {p["name"]: p for p in json.loads(out)["plugins"]}
    audio, video = plugins["audio"], plugins["video"]
    assert (audio["distribution"], audio["version"], audio["status"]) == ("optima-audio", "0.1.0", "ok")
    assert (video["distribution"], video["version"], video["status"]) == ("optima-video", "0.1.0", "ok")
    assert audio["hooks"] == ["optima_register_models", "optima_register_tasks", "optima_register_policies"]
    components = {c["gin"]: c for p in (audio, video) for c in p["components"]}
    assert set(components) == {"audio_coca_model", "synthetic_av_task", "epsilon_greedy_policy",
                               "video_coca_model", "moving_shapes_task"}
    assert components["audio_coca_model"]["modules"] == ["image", "text", "multimodal", "audio"]
    assert components["video_coca_model"]["modules"] == ["image", "text", "multimodal", "video"]
    greedy = plugins["greedy"]  # the tutorial's package, as docs/plugins.md writes it
    assert (greedy["distribution"], greedy["version"], greedy["status"]) == ("optima-greedy", "0.1.0", "ok")
    assert [c["gin"] for c in greedy["components"]] == ["greedy_policy"]


def test_installed_packages_gin_files_run_and_include_by_package_name(installed, monkeypatch, tmp_path):
    """Gin files that the wheels ship (package data): parsed by package name from
    any folder, included by package name from a user's file; a wrong name is one
    line naming what the package ships."""
    from optima.experiment import experiment

    monkeypatch.syspath_prepend(str(installed))
    monkeypatch.delenv("OPTIMA_DISABLE_PLUGINS", raising=False)
    monkeypatch.chdir(tmp_path)  # not the repository: nothing is found by a relative path
    for name in [m for m in sys.modules if m.split(".")[0] in ("optima_audio", "optima_video", "optima_greedy")]:
        monkeypatch.delitem(sys.modules, name)  # imported from source by earlier tests: use the installed ones
    shipped = config.package_file("optima_audio:gin/audio_av.gin")
    assert shipped == installed / "optima_audio" / "gin" / "audio_av.gin" and shipped.is_file()
    mine = tmp_path / "mine.gin"
    mine.write_text("include 'optima_greedy:gin/greedy.gin'\ndistillation.rounds = 80\n")
    try:
        config.setup()
        config.parse(["optima_video:gin/moving_shapes.gin"])
        assert len(experiment(None, dry_run=True)["stages"]["student"]["arms"]) == 15
        config.parse([str(mine)])  # the docs' tutorial file, which includes OPTIMA's quickstart
        assert gin.query_parameter("distillation.policy").selector == "greedy_policy"
        assert gin.query_parameter("distillation.rounds") == 80
        with pytest.raises(ConfigError, match=r"optima_audio:gin/nope\.gin: package optima_audio \(.*\) has no "
                                              r"file gin/nope\.gin; it ships gin/audio_av\.gin$"):
            config.parse(["optima_audio:gin/nope.gin"])
        with pytest.raises(ConfigError, match=r"no installed Python package 'optima_nope'"):
            config.parse(["optima_nope:gin/x.gin"])
    finally:
        gin.clear_config()
        config.setup(external_plugins=False)


def _distil(installed, monkeypatch, tmp_path, gin_file, *bindings):
    """`optima run` on an example gin file with tiny bindings; returns the student
    stage of metrics.json and the operative config."""
    monkeypatch.syspath_prepend(str(installed))
    monkeypatch.delenv("OPTIMA_DISABLE_PLUGINS", raising=False)
    run_dir = tmp_path / "run"
    args = ["run", str(gin_file), "--run-dir", str(run_dir)]
    for b in bindings:
        args += ["-b", b]
    # Width-64 models make every op tiny: a second thread only adds waiting, and
    # on a busy shared machine it made these runs several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, args)
    finally:
        torch.set_num_threads(threads)
        config.setup(external_plugins=False)  # what follows sees the built-ins only
    assert result.exit_code == 0, result.output
    stage = json.loads((run_dir / "metrics.json").read_text())["stages"]["student"]
    return stage, (run_dir / "operative_config.gin").read_text()


# 16 rounds of 1 step: a warm-up that plays each of the 15 arms once (the first
# round is played again, having no reward), on a handful of examples.
TINY_RUN = ["teacher_training.steps = 2", "teacher_training.batch_size = 4", "teacher_training.warmup_steps = 0",
            "distillation.rounds = 16", "distillation.steps_per_round = 1", "distillation.batch_size = 4",
            "distillation.warmup_steps = 0"]


def _check_arms(stage, module):
    arms = stage["arms"]
    assert len(arms) == 2 ** 4 - 1 and module in arms
    played = [arms[k] for k in stage["plays"]]
    assert len(played) == 16
    with_module = [a for a in played if module in a.split("+")]
    assert with_module and set(with_module) == {a for a in arms if module in a.split("+")}


@pytest.mark.slow
def test_audio_example_distils_with_its_own_policy(installed, monkeypatch, tmp_path):
    stage, operative = _distil(
        installed, monkeypatch, tmp_path, "optima_audio:gin/audio_av.gin", *TINY_RUN,
        "synthetic_av_task.train_size = 32", "synthetic_av_task.val_size = 0", "synthetic_av_task.test_size = 8",
        "teacher/audio_coca_model.layers = (1, 1, 1, 1)", "student/audio_coca_model.layers = (1, 1, 1, 1)")
    _check_arms(stage, "audio")
    assert re.search(r"^(\w+/)?distillation\.policy = @epsilon_greedy_policy$", operative, re.M)
    assert re.search(r"^(\w+/)?epsilon_greedy_policy\.epsilon = 0\.1$", operative, re.M)


@pytest.mark.slow
def test_video_example_distils(installed, monkeypatch, tmp_path):
    stage, operative = _distil(
        installed, monkeypatch, tmp_path, "optima_video:gin/moving_shapes.gin", *TINY_RUN,
        "moving_shapes_task.train_size = 32", "moving_shapes_task.val_size = 0", "moving_shapes_task.test_size = 8",
        "teacher/video_coca_model.layers = (1, 1, 1, 1)", "student/video_coca_model.layers = (1, 1, 1, 1)",
        "optima_policy.warmup_rounds = 15")
    _check_arms(stage, "video")
    assert re.search(r"^(\w+/)?distillation\.policy = @optima_policy$", operative, re.M)
