"""`optima.checkpoint`: the codec, atomic and verified checkpoints, fallback,
full disks, safe loading, RNG states, interrupts, config comparison."""
from __future__ import annotations

import errno
import json
import math
import os
import pickle
import random
import signal

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optima import checkpoint as ck
from optima.checkpoint import (CheckpointError, CheckpointManager, CheckpointWriteError, Interrupted, Interrupts,
                               check_same_layout, config_differences, decode, encode, rng_state, set_rng_state)


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, 3, generator=g)
    return {
        "student": {"w": weight, "tied": weight, "b": torch.zeros(3, dtype=torch.bfloat16)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4, 3)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "foreach": None, "params": [0]}]},
        "policy": {"generator": g.get_state(), "recent": torch.zeros(0, dtype=torch.int64)},
        "step": 12, "previous": {"kd": 0.1 + 0.2, "hidden": math.inf}, "history": [{"reward": None}],
        "rng": rng_state(),
    }


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# --- codec ---------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64), st.text(max_size=8),
                    st.floats(allow_nan=True, allow_infinity=True))
tensors = st.builds(lambda shape, seed, dtype: (torch.randn(shape, generator=torch.Generator().manual_seed(seed))
                                                * 100).to(dtype),
                    st.lists(st.integers(0, 3), max_size=3), st.integers(0, 99),
                    st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.uint8]))
trees = st.recursive(scalars | tensors, lambda children: st.one_of(
    st.lists(children, max_size=4), st.tuples(children, children),
    st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-5, 5)), children, max_size=4)), max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(tree=trees)
def test_property_codec_round_trips_through_json_and_safetensors(tree):
    from safetensors.torch import load, save

    found: dict = {}
    data = json.loads(json.dumps(encode(tree, found), allow_nan=False))
    back = decode(data, load(save(ck._clonable(found))))
    assert _equal(tree, back)


def test_codec_refuses_what_it_cannot_store():
    with pytest.raises(TypeError, match="object at optimizer.x"):
        encode({"optimizer": {"x": object()}}, {})


# --- checkpoints ---------------------------------------------------------------------

def test_save_load_round_trip_and_manifest(tmp_path):
    manager = CheckpointManager(tmp_path / "c", keep=3)
    path = manager.save(_state(), step=12, round=6, meta={"stage": "student", "key": "abc"})
    assert path.name == "step-000000012" and not list((tmp_path / "c").glob(".*"))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 12 and manifest["round"] == 6 and manifest["key"] == "abc"
    assert set(manifest["files"]) == {"tensors.safetensors", "state.json"}
    assert manifest["files"]["state.json"]["sha256"] == ck.sha256(path / "state.json")
    loaded = manager.latest()
    assert loaded.path == path and loaded.step == 12
    assert _equal(_state(), loaded.state)


def test_only_the_last_k_are_kept(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (2, 4, 6, 8):
        manager.save({"step": step}, step=step)
    assert [p.name for p in manager.paths()] == ["step-000000006", "step-000000008"]
    assert manager.latest().state == {"step": 8}


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "bad_json"])
def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    warnings = []
    manager = CheckpointManager(tmp_path, keep=3, warn=warnings.append)
    manager.save(_state(1), step=4)
    newest = manager.save(_state(2), step=8)
    target = newest / "tensors.safetensors"
    if damage == "truncate":
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size, one bit changed: only the checksum sees it
        data = bytearray(target.read_bytes())
        data[-1] ^= 1
        target.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
    else:
        (newest / "state.json").write_text("{")
    loaded = manager.latest()
    assert loaded.step == 4 and _equal(_state(1), loaded.state)
    assert len(warnings) == 1 and "step-000000008" in warnings[0] and "corrupt" in warnings[0]
    assert "falling back" in warnings[0]
    assert (tmp_path / "step-000000008.corrupt").is_dir()  # kept aside, no longer a candidate
    # the next save replaces nothing good and clears the corrupt one away
    manager.save(_state(3), step=6)
    assert [p.name for p in manager.paths()] == ["step-000000004", "step-000000006"]
    assert not (tmp_path / "step-000000008.corrupt").exists()


def test_every_checkpoint_corrupt_is_an_error(tmp_path):
    manager = CheckpointManager(tmp_path, warn=lambda _: None)
    path = manager.save({"a": 1}, step=1)
    (path / "state.json").write_text("[]")
    with pytest.raises(CheckpointError, match="every checkpoint .* is corrupt"):
        manager.latest()


def test_no_checkpoint_is_none(tmp_path):
    assert CheckpointManager(tmp_path / "nothing").latest() is None


def test_a_save_killed_halfway_leaves_a_tmp_dir_that_is_ignored_and_removed(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save({"a": 1}, step=2)
    half = tmp_path / ".step-000000004.tmp"
    half.mkdir()
    (half / "tensors.safetensors").write_bytes(b"partial")
    assert manager.latest().step == 2
    CheckpointManager(tmp_path)  # a new process starts
    assert not half.exists()


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    first = manager.save(_state(1), step=2)

    def full_disk(path, tensors):
        path.write_bytes(b"\0" * 100)  # part of the file made it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "_write_tensors", full_disk)
    with pytest.raises(CheckpointWriteError) as info:
        manager.save(_state(2), step=4)
    message = str(info.value)
    assert "no space left on device" in message and "step-000000004" in message
    assert f"the previous checkpoint {first} is intact" in message
    assert info.value.exit_code == 1 and info.value.resumable
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000002"]  # no leftovers
    assert _equal(manager.latest().state, _state(1))


def test_write_atomic_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "metrics.json"
    ck.write_text_atomic(target, "old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointWriteError, match="no space left"):
        ck.write_atomic(target, fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_loading_never_unpickles(tmp_path):
    """A checkpoint whose tensor file is a pickle (with a matching manifest, as an
    attacker would write it) is refused as corrupt, and the pickle never runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = CheckpointManager(tmp_path / "c").save({"a": torch.ones(2)}, step=1)
    (path / "tensors.safetensors").write_bytes(pickle.dumps(Payload()))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["tensors.safetensors"] = {"bytes": (path / "tensors.safetensors").stat().st_size,
                                                "sha256": ck.sha256(path / "tensors.safetensors")}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="corrupt"):
        CheckpointManager.load(path)
    assert not marker.exists()


def test_another_architecture_is_refused_naming_the_keys():
    current = {"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(3), "c": torch.zeros(1)}
    saved = {"a.weight": torch.zeros(4, 4), "b.weight": torch.zeros(3), "d": torch.zeros(1)}
    with pytest.raises(CheckpointError) as info:
        check_same_layout(saved, current, "student", "runs/x/checkpoints/student/step-000000004")
    message = str(info.value)
    assert "another architecture for the student" in message and "step-000000004" in message
    assert "missing c" in message and "unexpected d" in message and "a.weight (4, 4) vs (2, 2)" in message
    check_same_layout(current, current, "student", "x")  # the same layout passes


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    manager.save({"rng": rng_state()}, step=1)
    expected = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(manager.latest().state["rng"])
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()) == expected


# --- interrupts ------------------------------------------------------------------------

def test_the_first_signal_asks_to_stop_the_second_stops_at_once():
    before = signal.getsignal(signal.SIGTERM)
    with Interrupts() as interrupts:
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupts.requested == signal.SIGTERM
        stop = interrupts.stop("after step 3", None)
        assert isinstance(stop, Interrupted) and stop.exit_code == 143 and "SIGTERM after step 3" in str(stop)
        with pytest.raises(Interrupted) as info:
            os.kill(os.getpid(), signal.SIGINT)
        assert info.value.exit_code == 130 and "without saving" in str(info.value)
    assert signal.getsignal(signal.SIGTERM) is before


# --- config comparison -------------------------------------------------------------------

SAVED = """# optima run gin/quickstart.gin -b 'distillation.rounds = 4'
# Parameters for distillation:
# ==============================================================================
distillation.checkpoint_every = 2
distillation.rounds = 4
distillation.arms = [['image'],
                     ['text']]
TINY = \\
    {'a': 1,
     'b': 2}
student/optima_policy.gamma = 0.9
"""


def test_config_differences_name_the_bindings_and_ignore_operational_ones():
    assert config_differences(SAVED, SAVED) == []
    current = (SAVED.replace("distillation.rounds = 4", "distillation.rounds = 6")
               .replace("checkpoint_every = 2", "checkpoint_every = 5")
               .replace("'b': 2", "'b': 3").replace("student/optima_policy.gamma = 0.9\n", "")
               + "distillation.on_nonfinite = 'skip'\nteacher_training.steps = 3\n")
    assert config_differences(SAVED, current) == [
        "TINY ({'a': 1, 'b': 2} -> {'a': 1, 'b': 3})", "distillation.rounds (4 -> 6)",
        "student/optima_policy.gamma (0.9 -> unset)", "teacher_training.steps (unset -> 3)"]
    # the same bindings formatted differently are the same
    assert config_differences(SAVED, SAVED.replace("[['image'],\n                     ['text']]",
                                                   "[['image'], ['text']]")) == []


def test_a_corrupt_stage_cache_file_is_redone_not_loaded(tmp_path):
    """A cache entry damaged outside a run (the writes themselves are atomic) is
    reported and removed, so the stage is trained again."""
    from optima.experiment import _load_cached, _save_atomic

    class Messages:
        def __init__(self):
            self.lines = []

        def on_message(self, text):
            self.lines.append(text)

    net = torch.nn.Linear(3, 2)
    path = tmp_path / "teacher-abc.safetensors"
    _save_atomic(net, path)
    messages = Messages()
    assert _load_cached(torch.nn.Linear(3, 2), path, torch.device("cpu"), messages)
    path.write_bytes(path.read_bytes()[:20])
    assert not _load_cached(torch.nn.Linear(3, 2), path, torch.device("cpu"), messages)
    assert not path.exists() and "is unreadable" in messages.lines[0] and "redoing it" in messages.lines[0]
