"""The core interfaces of OPTIMA. Nothing here knows about CoCa or any task.

A plugin fills these in; the engine (`optima.engine`) only talks to them:

- `Module`: a named, ordered group of transformer layers of a model.
- `DistillableModel`: a model split into `Module`s that maps a batch to features.
- `Reward`: two consecutive rounds' losses (`RoundLosses`) -> a reward in [0, 1].
- `Policy`: picks an arm each round and learns from its reward.
- `Loss`: the step objective for the played arm, the whole-model and per-module terms.
- `Task`: data splits, the task loss and the metric; optionally a `BatchSource`
  (batch k made alone) so that worker processes make its batches.

`ArmSpace` (the arms over a model's modules) is concrete: see `optima.arms`.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from optima.errors import ConfigError

Batch = Mapping[str, Any]
#: A batch may list under this key one line per example its task left out (a
#: damaged file, named): the engine drops the key, warns once per line and
#: counts them in the run's summary; a batch whose examples were all left out
#: has no rows and is passed over.
SKIPPED_RECORDS = "skipped_records"
# Loss values by term: "task", "kd", "hidden", "attn".
LossTerms = Mapping[str, float]


@dataclass(frozen=True)
class Layer:
    """One transformer layer as distillation sees it.

    `block` is the sub-module whose forward output is the layer's hidden state
    `(batch, seq, width)`; `attentions` are the `nn.MultiheadAttention`s whose
    head-averaged probabilities are matched (a decoder layer has a self- and a
    cross-attention).
    """

    block: nn.Module
    attentions: tuple[nn.MultiheadAttention, ...]
    #: Other sub-modules of the layer, outside `block` (e.g. a decoder layer's
    #: self-attention block when `block` is its cross-attention block): only
    #: for counting the layer's parameters.
    extra: tuple[nn.Module, ...] = ()

    def parameters(self) -> list[nn.Parameter]:
        """The layer's parameters (block, attentions, extra), each once."""
        seen: dict[int, nn.Parameter] = {}
        for part in (self.block, *self.attentions, *self.extra):
            for p in part.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())


@dataclass(frozen=True)
class Module:
    """A named, ordered group of transformer layers (e.g. CoCa's image encoder).

    Hidden states and attention probabilities of its layers are read through an
    `optima.taps.Recorder` attached to the model.
    """

    name: str
    layers: tuple[Layer, ...]

    @property
    def width(self) -> int:
        return self.layers[0].attentions[0].embed_dim

    def __len__(self) -> int:
        return len(self.layers)

    def num_parameters(self) -> int:
        """Parameters of the module's layers (embeddings, poolers and norms
        outside the layers are not counted)."""
        return sum(p.numel() for layer in self.layers for p in layer.parameters())


class DistillableModel(nn.Module, abc.ABC):
    """A multimodal model split into `Module`s, same names for teacher and student."""

    #: Width of the features `forward` returns (what a head consumes).
    feature_dim: int

    @abc.abstractmethod
    def distill_modules(self) -> Sequence[Module]:
        """The model's modules, in a fixed order."""

    @abc.abstractmethod
    def forward(self, batch: Batch) -> torch.Tensor:
        """Features `(batch, seq, feature_dim)` for a task head."""

    def module_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.distill_modules())

    def pretraining_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The model's own pretraining objective on a batch of image-caption pairs
        (the captioning batch format: `image`, `text`, `labels`), as named,
        unweighted terms (CoCa: `contrastive`, `caption`); the `pretraining` stage
        weighs and sums them. A model without one cannot be pretrained here."""
        from optima.errors import ConfigError

        raise ConfigError(f"{type(self).__name__} has no pretraining objective "
                          "(DistillableModel.pretraining_losses); it cannot be in experiment.pretraining")

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The weights as a checkpoint the model's factory loads (its `pretrained` or
        `init_from` binding): what a pretraining stage writes. Default: `state_dict()`."""
        return self.state_dict()

    def export(self, directory: str, name: str) -> dict[str, Any]:
        """Optional: write the model to `directory` in its own library's format,
        loadable there without OPTIMA (`optima export`; CoCa: an open_clip model
        config and state dict). `name` is the model's name in that library.
        Returns `{"format": ..., "files": [...], "load": <Python code that loads
        it, with no OPTIMA import, into `model`>, "wrap": <code that wraps that
        `model` into this DistillableModel class, for `optima.export.load_head`>}`. The default refuses: the model cannot be exported."""
        raise ConfigError(f"{type(self).__name__} cannot be exported: it does not implement "
                          f"DistillableModel.export (docs/plugins.md)")

    def load_export(self, directory: str) -> None:
        """Load into this model (same architecture) what `export` wrote to `directory`."""
        raise ConfigError(f"{type(self).__name__} cannot load an export: it does not implement "
                          f"DistillableModel.load_export (docs/plugins.md)")


class Head(nn.Module, abc.ABC):
    """Maps a model's features to task outputs (logits)."""

    @abc.abstractmethod
    def forward(self, features: torch.Tensor) -> torch.Tensor: ...


class BatchSource(abc.ABC):
    """One pass of `Task.batches` as a map: `len(source)` batches, batch `k` made
    alone, in any process and in any order.

    The engine hands a source to `torch.utils.data.DataLoader` worker processes,
    which make batches in parallel and ahead of the step. So a source is
    pickled (no open files, pools or locks in it), and `batch(k)` depends only
    on `k` and the pass's arguments (randomness from a generator seeded per
    batch, drawn up front; never a global RNG): then the batches are the same
    for any number of workers, and a resumed run starts at its batch unmade.
    """

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def batch(self, k: int) -> Batch:
        """Batch `k` of the pass, equal to the k-th batch `Task.batches` yields."""

    def shard(self, k: int, rank: int, world: int) -> Batch:
        """Process `rank`'s share of batch `k` in a run of `world` processes: its
        rows `shard_rows(n, rank, world)`. This default makes the whole batch and
        slices it; override it to make only those rows (the image tasks do)."""
        return slice_rows(self.batch(k), rank, world)

    def packed_shard(self, k: int, rank: int, world: int) -> Batch:
        """`shard(k, rank, world)` in the form it travels in from a DataLoader
        worker to the device that trains, where `unpack` finishes it:
        `unpack(packed_shard(k, r, w))` equals `shard(k, r, w)`. This default is
        the shard itself; the image tasks send uint8 pixels (a quarter of
        float32's bytes through shared memory and the host-to-device copy) and
        normalise them on the device."""
        return self.shard(k, rank, world)

    def unpack(self, batch: Batch) -> Batch:
        """A `packed_shard`, already on its device, as the shard."""
        return batch


def shard_rows(n: int, rank: int, world: int) -> slice:
    """The rows of an `n`-row batch that process `rank` of `world` gets: contiguous,
    sizes differing by at most one, in rank order."""
    return slice(n * rank // world, n * (rank + 1) // world)


def batch_rows(batch: Batch) -> int:
    """The number of examples in a batch: the leading size of its first tensor
    with a batch dimension (0 if it has none)."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return 0


def slice_rows(batch: Batch, rank: int, world: int) -> dict[str, Any]:
    """`batch` cut to the rows of `rank` (see `shard_rows`): tensors and lists
    with the batch's leading size are sliced, anything else is kept."""
    if world == 1:
        return dict(batch)
    n = batch_rows(batch)
    rows = shard_rows(n, rank, world)
    return {k: v[rows] if isinstance(v, (torch.Tensor, list, tuple)) and len(v) == n and k != SKIPPED_RECORDS else v
            for k, v in batch.items()}


class Task(abc.ABC):
    """Data and evaluation of one task. Batches are dicts of tensors."""

    #: Number of outputs the head must produce.
    num_outputs: int

    @abc.abstractmethod
    def batches(self, split: str, batch_size: int, *, shuffle: bool, seed: int) -> Iterator[Batch]:
        """One pass over `split` ("train", "val" or "test"). A batch may leave out
        examples it cannot read, listed under `SKIPPED_RECORDS`."""

    def check_data(self, splits: Sequence[str]) -> None:
        """Cheap checks, before any work, that `splits` can be read: files exist and
        are not empty, sizes are positive. Raise `optima.errors.ConfigError` naming
        the file or binding. This default checks nothing; a split that turns out
        to have no examples is refused when the run starts anyway."""

    def batches_from(self, split: str, batch_size: int, *, seed: int, start: int) -> Iterator[Batch]:
        """`batches(split, batch_size, shuffle=True, seed=seed)` from batch `start`
        on: where a resumed run picks its data order up again. This default makes
        the first `start` batches and drops them, before returning (the engine
        calls it with every global RNG preserved); a task whose batches are
        costly to make (images read from disk) overrides it to skip them unmade."""
        it = iter(self.batches(split, batch_size, shuffle=True, seed=seed))
        for _ in range(start):
            if next(it, None) is None:  # the pass ended there
                break
        return it

    def batch_source(self, split: str, batch_size: int, *, shuffle: bool, seed: int) -> BatchSource | None:
        """The pass `batches(split, batch_size, shuffle=shuffle, seed=seed)` as a
        `BatchSource`, so that DataLoader worker processes make its batches (decode,
        augmentation, tokenisation off the training process, ahead of the step);
        None (this default): the engine calls `batches` in the training process."""
        return None

    @abc.abstractmethod
    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The task loss `L_pred`."""

    def logit_mask(self, batch: Batch) -> torch.Tensor | None:
        """For per-token logits `(B, L, V)`: a `(B, L)` bool mask of the positions
        that are predictions (not padding), which KD then compares alone; None
        (the default): every position counts."""
        return None

    @abc.abstractmethod
    def metric(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        """Per-batch sums of the metric, e.g. `{"correct": 7, "count": 8}`."""

    @abc.abstractmethod
    def summarize(self, totals: Mapping[str, float]) -> dict[str, float]:
        """Metric sums over a split -> reported metrics, e.g. `{"accuracy": 0.9}`."""

    #: File name of the predictions in the task's official results format
    #: (e.g. "vqa_results.json"; ".json": a JSON list of the records, ".csv":
    #: one line of values per record); None: the task writes no predictions.
    predictions_file: str | None = None

    def predictions(self, logits: torch.Tensor, batch: Batch) -> list[dict[str, Any]]:
        """One record per example of `batch`, in the official results format
        (e.g. VQA: `{"question_id": 1, "answer": "yes"}`). Only called when
        `predictions_file` is set."""
        raise NotImplementedError(f"{type(self).__name__} sets predictions_file but does not implement predictions")

    def evaluate(self, network: nn.Module, batches: Iterable[Batch],
                 predictions: list[dict[str, Any]] | None = None) -> dict[str, float]:
        """Metrics of `network` (`batch -> logits`) over `batches` (already on its device),
        called under `no_grad` in eval mode; with a `predictions` list, the
        records of `predictions(logits, batch)` are appended to it in the same
        pass. Override for generation (e.g. captioning); an override of a task
        with a `predictions_file` fills `predictions` itself."""
        totals: dict[str, float] = {}
        for batch in batches:
            logits = network(batch).float()
            for k, v in self.metric(logits, batch).items():
                totals[k] = totals.get(k, 0.0) + float(v)
            if predictions is not None:
                predictions.extend(self.predictions(logits, batch))
        return self.summarize(totals)


@dataclass(frozen=True, eq=True)
class RoundLosses(Mapping[str, float]):
    """One round's distillation losses, each summed over the round's steps: what a
    `Reward` compares.

    - `total[term]`: the whole model ("task", "kd", and "hidden"/"attn" over every
      layer when the reward reads them). The object is also a read-only mapping of
      these totals: `losses["kd"]` is `losses.total["kd"]`.
    - `per_module[module][term]`: a layer term ("hidden", "attn") summed over one
      module's layers. Every module has the terms the reward reads; the played
      arm's modules also have the terms that trained them.
    - `arm`: the played arm, as the names of its modules (e.g. `("image", "text")`).
    - `steps`: how many steps (or probe batches) the sums are over (0: not known),
      so a reward can read a per-step mean (`alignment_reward`).
    """

    total: Mapping[str, float]
    per_module: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    arm: tuple[str, ...] = ()
    steps: int = 0

    def __getitem__(self, term: str) -> float:
        return self.total[term]

    def __iter__(self) -> Iterator[str]:
        return iter(self.total)

    def __len__(self) -> int:
        return len(self.total)

    def of_arm(self, term: str, arm: Sequence[str] | None = None) -> float:
        """`term` summed over the modules of `arm` (default: the played arm)."""
        return sum(self.per_module[m][term] for m in (self.arm if arm is None else arm))

    def arm_totals(self) -> dict[str, float]:
        """The played arm's sums, `{term: of_arm(term)}`, for the layer terms that
        every module of the arm has."""
        held = [self.per_module.get(m, {}) for m in self.arm]
        return {t: self.of_arm(t) for t in (held[0] if held else {}) if all(t in h for h in held)}

    def __repr__(self) -> str:
        return (f"RoundLosses(total={dict(self.total)!r}, per_module={dict(self.per_module)!r}, arm={self.arm!r}, "
                f"steps={self.steps})")


class Reward(abc.ABC):
    """Turns the losses of two consecutive rounds into a reward in [0, 1].

    `previous` and `current` are `RoundLosses` (whole-model totals, per-module
    sums, the played arm); `previous` is the last round whose terms were finite
    (its arm may differ from `current.arm`)."""

    #: The loss terms this reward reads, a subset of ("kd", "hidden", "attn"). The
    #: loss computes the layer terms among them for every layer (no grad outside
    #: the arm), so `total` and every module of `per_module` hold them.
    terms: tuple[str, ...]

    #: Where `previous` and `current` are measured: None (the rounds' own training
    #: losses, or the training-batch probe of `distillation.reward_probe`), or
    #: `(split, batches)`: the whole model's losses on that many fixed batches of
    #: the task's `split` (e.g. `("val", 4)`), before and after each round.
    probe: tuple[str, int] | None = None

    @abc.abstractmethod
    def __call__(self, previous: RoundLosses, current: RoundLosses) -> float: ...

    def state_dict(self) -> dict[str, Any]:
        """What a stateful reward (one that remembers earlier rounds) needs to resume
        exactly; saved in the distillation checkpoint. Stateless rewards: `{}`."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`."""


class Policy(abc.ABC):
    """A bandit over arms `0..num_arms-1`. Draws only from its own seeded generator,
    so that every process given the same seed and rewards plays the same arms."""

    num_arms: int

    @abc.abstractmethod
    def select(self) -> int: ...

    @abc.abstractmethod
    def update(self, arm: int, reward: float) -> None: ...

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Tensors worth logging each round: per arm `(num_arms,)` (e.g. posterior
        mean, sd), scalars `()`, and per unit `(units,)` under a name starting
        with `unit_` (units: the modules or layer groups arms are made of)."""
        return {}


@dataclass
class StepLosses:
    """What `Loss` returns for one step. Values are floats or 0-dim tensors
    (better: the engine reads every tensor of a step back in one device sync,
    and returns them to callers as floats)."""

    #: The objective to back-propagate: task + KD + the played arm's layer losses.
    objective: torch.Tensor
    #: Whole-model values (no grad): "task", "kd", and "hidden"/"attn" summed over
    #: every layer when computed for every layer (the reward reads them); a layer
    #: term computed only for some layers is left out, never reported partial.
    full: dict[str, float | torch.Tensor] = field(default_factory=dict)
    #: Per module, each layer term computed for all of that module's layers
    #: (the reward's terms for every module; the played arm's training terms).
    per_module: dict[str, dict[str, float | torch.Tensor]] = field(default_factory=dict)
    #: The played arm's weighted layer terms per module, with their gradients: the
    #: parts of `objective` a gate may drop (`distillation.alignment_gate`). Optional.
    arm_terms: dict[str, torch.Tensor] = field(default_factory=dict)


class Loss(nn.Module, abc.ABC):
    """The distillation objective. It may own parameters (e.g. projections),
    which are trained with the student."""

    @abc.abstractmethod
    def forward(self, student: "Capture", teacher: "Capture", task_loss: torch.Tensor,
                arm_layers: frozenset[tuple[str, int]], need: frozenset[str]) -> StepLosses:
        """`arm_layers`: `(module, layer index)` pairs that get layer losses with
        gradients; `need`: terms the reward reads, to be computed for every layer
        (others may be skipped outside the arm). Returns the objective, the
        whole-model terms and the per-module sums (`StepLosses`)."""


@dataclass
class Capture:
    """One forward pass of a network: its logits, its recorder, and which logit
    positions count (`Task.logit_mask`; None: all)."""

    logits: torch.Tensor
    recorder: Any  # optima.taps.Recorder (kept untyped to avoid an import cycle)
    mask: torch.Tensor | None = None
