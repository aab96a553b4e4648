"""Students initialised from a deeper CoCa: layers sampled uniformly per module,
everything else copied; weight choices; building on the meta device."""
import copy

import pytest
import torch

from optima.errors import ConfigError
from optima.plugins.models.coca import LAYER_LISTS, coca_model, init_student_from

from conftest import TINY_COCA

SOURCE_ARCH = copy.deepcopy(TINY_COCA)
for _part in ("vision_cfg", "text_cfg", "multimodal_cfg"):
    SOURCE_ARCH[_part]["layers"] = 6


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(123)
    return coca_model(SOURCE_ARCH)


@pytest.fixture(scope="module", params=["plain", "wrapped"])
def checkpoint(request, source, tmp_path_factory):
    """The source saved in open_clip's formats: a plain state dict, or {"state_dict": ...}."""
    path = tmp_path_factory.mktemp("ckpt") / f"source-{request.param}.pt"
    sd = source.coca.state_dict()
    torch.save(sd if request.param == "plain" else {"state_dict": sd, "epoch": 3}, path)
    return str(path)


def _assert_sampled(student, source, expected):
    s_sd, t_sd = student.coca.state_dict(), source.coca.state_dict()
    checked = set()
    for module, prefixes in LAYER_LISTS.items():
        for prefix in prefixes:
            for i, j in enumerate(expected[module]):
                for key in [k for k in s_sd if k.startswith(f"{prefix}.{i}.")]:
                    src = f"{prefix}.{j}." + key[len(f"{prefix}.{i}."):]
                    assert torch.equal(s_sd[key], t_sd[src]), (key, src)
                    checked.add(key)
    others = [k for k in s_sd if k not in checked]
    assert "visual.conv1.weight" in others and "text_decoder.text_projection" in others
    assert "visual.attn_pool.query" in others and "logit_scale" in others
    for key in others:  # embeddings, poolers, norms, projections: copied as is
        assert torch.equal(s_sd[key], t_sd[key]), key


@pytest.mark.parametrize("layers, expected", [((2, 2, 2), [2, 5]), ((3, 3, 3), [1, 3, 5]), ((6, 6, 6), list(range(6)))])
def test_uniform_sampling_copies_the_source_layers_exactly(source, checkpoint, layers, expected):
    torch.manual_seed(0)  # the student's own random init differs from the source's
    student = coca_model(SOURCE_ARCH, layers=layers, init_from=checkpoint)
    sampled = {m: expected for m in LAYER_LISTS}
    assert student.init_report == {"init": "sampled", "source": checkpoint, "source_arch": "dict",
                                   "layers": sampled, "loaded": True}
    assert student.checkpoints == {"init_from": checkpoint}
    _assert_sampled(student, source, sampled)


def test_per_module_depths_and_an_explicit_source_arch(source, checkpoint):
    # the student's own arch has 4 layers per module; the source (init_from_arch) has 6
    student = coca_model(TINY_COCA, layers=(3, 2, 1), init_from=checkpoint, init_from_arch=SOURCE_ARCH)
    expected = {"image": [1, 3, 5], "text": [2, 5], "multimodal": [5]}
    assert student.init_report["layers"] == expected
    _assert_sampled(student, source, expected)


def test_init_student_from_models(source):
    student = coca_model(TINY_COCA, layers=(2, 3, 1))
    assert init_student_from(student, source) == {"image": [2, 5], "text": [1, 3, 5], "multimodal": [5]}
    _assert_sampled(student, source, {"image": [2, 5], "text": [1, 3, 5], "multimodal": [5]})
    # the copy is a copy: the student trains without touching the source
    before = source.coca.visual.conv1.weight.clone()
    with torch.no_grad():
        student.coca.visual.conv1.weight.add_(1.0)
    assert torch.equal(source.coca.visual.conv1.weight, before)


def test_sampled_student_runs_and_matches_the_source_embeddings(source, checkpoint, tiny_batch):
    student = coca_model(SOURCE_ARCH, layers=(2, 2, 2), init_from=checkpoint)
    with torch.no_grad():
        assert torch.isfinite(student(tiny_batch)).all()
        torch.testing.assert_close(student.coca.visual._embeds(tiny_batch["image"]),
                                   source.coca.visual._embeds(tiny_batch["image"]))


def test_other_widths_are_refused_naming_the_parameters(checkpoint):
    arch = copy.deepcopy(SOURCE_ARCH)
    arch["vision_cfg"]["width"] = 48
    arch["vision_cfg"]["head_width"] = 12
    with pytest.raises(ConfigError, match=r"cannot initialise the student.*visual.conv1.weight student \(48, 3, 8, 8\) "
                                          r"vs source \(32, 3, 8, 8\)"):
        coca_model(arch, layers=(2, 2, 2), init_from=checkpoint, init_from_arch=SOURCE_ARCH)


def test_a_deeper_student_is_refused_naming_the_module(source):
    student = coca_model(TINY_COCA, layers=(2, 7, 2), random_init=True)
    with pytest.raises(ConfigError, match="student's text layers.*1..6 layers"):
        init_student_from(student, source)


def test_checkpoint_of_another_architecture_is_a_config_error(checkpoint):
    with pytest.raises(ConfigError, match="coca_model.init_from: checkpoint .* does not fit"):
        coca_model(TINY_COCA, layers=(2, 2, 2), init_from=checkpoint)  # source arch = TINY_COCA, 4 layers


def test_pretrained_loads_both_checkpoint_formats(source, checkpoint):
    model = coca_model(SOURCE_ARCH, pretrained=checkpoint)
    assert model.init_report == {"init": "pretrained", "source": checkpoint, "loaded": True}
    for k, v in source.coca.state_dict().items():
        assert torch.equal(model.coca.state_dict()[k], v), k


def test_weight_choices():
    assert coca_model(TINY_COCA, layers=(1, 1, 1)).init_report == {"init": "random"}  # dicts: random by default
    assert coca_model(TINY_COCA, layers=(1, 1, 1), random_init=True).init_report == {"init": "random"}
    with pytest.raises(ConfigError, match=r"coca_model\(arch='coca_ViT-B-32'\) has no weights bound.*random_init = True"):
        coca_model("coca_ViT-B-32", layers=(1, 1, 1))
    with pytest.raises(ConfigError, match="random_init = False but no checkpoint"):
        coca_model(TINY_COCA, random_init=False)
    with pytest.raises(ConfigError, match="random_init = True contradicts the bound coca_model.init_from"):
        coca_model(TINY_COCA, init_from="x.pt", random_init=True)
    with pytest.raises(ConfigError, match="bind one of coca_model.pretrained .* and coca_model.init_from"):
        coca_model(TINY_COCA, pretrained="a.pt", init_from="b.pt")
    with pytest.raises(ConfigError, match="init_from_arch is the architecture of coca_model.init_from"):
        coca_model(TINY_COCA, init_from_arch="coca_ViT-B-32")
    with pytest.raises(ConfigError, match="coca_model.init_from='missing.pt' is neither an existing file"):
        coca_model(TINY_COCA, init_from="missing.pt")


def test_meta_device_builds_without_memory_and_counts_parameters():
    cpu = coca_model(TINY_COCA, layers=(2, 2, 2))
    meta = coca_model(TINY_COCA, layers=(2, 2, 2), device="meta")
    assert all(p.is_meta for p in meta.parameters())
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in cpu.parameters())
    tiny12 = coca_model("coca_ViT-B-32", layers=(4, 4, 4), device="meta", random_init=True)
    assert sum(p.numel() for p in tiny12.parameters()) / 1e6 == pytest.approx(121.19, abs=0.01)
    assert tiny12.token_layout("image") == {"prefix": 1, "grid": (7, 7)}


def test_meta_dry_run_of_a_sampled_student_checks_shapes_and_loads_nothing():
    # as `optima run --dry-run` builds models: inside `with torch.device("meta")`, checkpoint not there
    with torch.device("meta"):
        tiny6 = coca_model("coca_ViT-B-32", layers=(2, 2, 2), init_from="checkpoints/not-downloaded.bin")
        teacher = coca_model("coca_ViT-L-14", pretrained="checkpoints/not-downloaded-either.bin")
    assert all(p.is_meta for p in tiny6.parameters())
    assert tiny6.init_report == {"init": "sampled", "source": "checkpoints/not-downloaded.bin",
                                 "source_arch": "coca_ViT-B-32", "layers": {"image": [5, 11], "text": [5, 11],
                                                                            "multimodal": [5, 11]}, "loaded": False}
    assert tiny6.checkpoints == {"init_from": "checkpoints/not-downloaded.bin"}
    assert teacher.init_report["loaded"] is False
    assert teacher.token_layout("image") == {"prefix": 1, "grid": (16, 16)}
    # a CoCa-Large source does not fit a CoCa-Base-width student, even on meta
    with torch.device("meta"), pytest.raises(ConfigError, match="cannot initialise the student"):
        coca_model("coca_ViT-B-32", layers=(2, 2, 2), init_from="x.bin", init_from_arch="coca_ViT-L-14")
