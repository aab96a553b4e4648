"""CoCa (open_clip's real `CoCa` class) as a `DistillableModel` with three modules:

- `image`: `visual.transformer.resblocks` (ViT blocks over class token + patches),
- `text`: `text.transformer.resblocks` (the unimodal text decoder, with CoCa's
  appended class token),
- `multimodal`: the decoder's layers, each a causal self-attention block
  (`text_decoder.resblocks[i]`) followed by a cross-attention block
  (`text_decoder.cross_attn[i]`); the layer's hidden state is the cross block's
  output and both attentions are matched.

A model that adds a module to CoCa (video, audio...) extends `CoCaExtension`
and builds on `CoCaModel`'s public `encode_image`, `encode_text`, `decode` and
`memory_width` (docs/plugins.md, "Adding a module to CoCa").

Token layouts (`CoCaModel.token_layout`, see `optima.align`): the image module is
one class token followed by the patch grid, so a teacher with smaller patches
(ViT-L/14: 16x16) is pooled onto the student's grid (ViT-B/32: 7x7); text and
decoder tokens are matched one to one. The decoder's cross-attention attends to
the image attentional pooler's outputs, not to patches, so teacher and student
need the same `vision_cfg.attn_pooler_queries`.

Students can be initialised from a deeper CoCa (`coca_model.init_from`,
`init_student_from`): each module's layers sampled uniformly from the same module
of the source, everything else (embeddings, poolers, norms, projections) copied.
"""
from __future__ import annotations

import abc
import contextlib
import copy
import os
import re
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from optima.errors import ConfigError
from optima.interfaces import Batch, DistillableModel, Layer, Module

MODULES = ("image", "text", "multimodal")
#: state-dict prefixes of each module's layer lists (a decoder layer is a self- and a cross-attention block)
LAYER_LISTS = {
    "image": ("visual.transformer.resblocks",),
    "text": ("text.transformer.resblocks",),
    "multimodal": ("text_decoder.resblocks", "text_decoder.cross_attn"),
}
_LAYER_KEY = re.compile(r"^(" + "|".join(re.escape(p) for ps in LAYER_LISTS.values() for p in ps) + r")\.(\d+)\.(.+)$")
_MODULE_OF = {p: m for m, ps in LAYER_LISTS.items() for p in ps}
#: the weights file of an export (a name open_clip's `local-dir:` loader looks for first)
EXPORT_WEIGHTS = "open_clip_model.safetensors"
#: `CoCaExtension.export`: the weights of the modules a plugin adds to CoCa.
EXTENSION_WEIGHTS = "extension.safetensors"


def _merge(base: dict, overrides: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, Mapping) else v
    return out


def coca_config(arch: str | Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                layers: Sequence[int] | None = None) -> dict:
    """An open_clip CoCa config: a registered name (`coca_ViT-B-32`) or a dict with
    `embed_dim`, `vision_cfg`, `text_cfg`, `multimodal_cfg`; then `overrides`
    (nested) and `layers` = (image, text, multimodal) layer counts."""
    import open_clip

    if isinstance(arch, str):
        cfg = open_clip.get_model_config(arch)
        if cfg is None or "multimodal_cfg" not in cfg:
            known = [n for n in open_clip.list_models() if n.startswith("coca")]
            raise ConfigError(f"coca_model.arch = {arch!r} is not a CoCa architecture open_clip knows: "
                              f"{', '.join(known)}, or an architecture dict")
    else:
        cfg = dict(arch)
    cfg = _merge(cfg, overrides or {})
    if layers is not None:
        if len(layers) != 3:
            raise ConfigError(f"coca_model.layers needs 3 counts (image, text, multimodal), got {list(layers)}")
        for part, n in zip(("vision_cfg", "text_cfg", "multimodal_cfg"), layers):
            cfg[part]["layers"] = int(n)
    cfg.pop("custom_text", None)
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg", "multimodal_cfg") if k not in cfg]
    if missing:
        raise ConfigError(f"CoCa architecture dict lacks {missing}")
    return cfg


class CoCaModel(DistillableModel):
    """Wraps an `open_clip.coca_model.CoCa`; `forward` returns the multimodal
    decoder's normalised token features `(B, L, width)`.

    Its public parts are what a model that extends CoCa builds on (see
    `CoCaExtension` and docs/plugins.md, "Adding a module to CoCa"):

    - `encode_image(images)`: the image tokens the decoder attends to,
    - `encode_text(text)`: the unimodal text tokens that enter the decoder,
    - `decode(memory, text_tokens)`: the multimodal decoder over any memory
      tokens of width `memory_width`,
    - `memory_width`, `feature_dim`, `distill_modules()`, `token_layout(module)`,
      `vocab_projection()`.

    `forward(batch)` is `decode(encode_image(batch["image"]), encode_text(batch["text"]))`.
    The decoder loop is spelled out (as in open_clip's `MultimodalTransformer`)
    to stop before the vocabulary projection, which classification does not use.
    """

    def __init__(self, coca: nn.Module, config: Mapping[str, Any] | None = None):
        super().__init__()
        self.coca = coca
        #: the open_clip config `coca` was built from (`coca_config`); `export` writes it
        self.config = None if config is None else copy.deepcopy(dict(config))
        #: how the weights were initialised (log-friendly; see `coca_model`)
        self.init_report: dict[str, Any] = {"init": "random"}
        #: checkpoint bindings, by name (a dry run reports whether they exist)
        self.checkpoints: dict[str, str] = {}
        self.feature_dim = coca.text_decoder.ln_final.normalized_shape[0]
        dec = coca.text_decoder
        self._modules_spec = (
            Module("image", tuple(Layer(b, (b.attn,)) for b in coca.visual.transformer.resblocks)),
            Module("text", tuple(Layer(b, (b.attn,)) for b in coca.text.transformer.resblocks)),
            Module("multimodal", tuple(Layer(x, (s.attn, x.attn), extra=(s,))
                                      for s, x in zip(dec.resblocks, dec.cross_attn))),
        )

    def distill_modules(self) -> Sequence[Module]:
        return self._modules_spec

    @property
    def memory_width(self) -> int:
        """The width of the decoder's memory tokens (its cross-attention keys and
        values): what `decode` takes, so what a new module's tokens are projected to.
        open_clip's decoder cross-attends at its own width, `multimodal_cfg.width`."""
        return self.coca.text_decoder.width

    def token_layout(self, module: str) -> dict[str, Any] | None:
        """How `module`'s tokens are laid out, for `optima.align`:

        - `image`: `{"prefix": 1, "grid": (rows, cols)}`, the class token then the
          patch grid (open_clip's ViT always has one class token);
        - `text`: None (text tokens plus the appended class token, one to one);
        - `multimodal`: one to one, and the cross-attention keys (the attentional
          pooler's outputs) must have the same count in teacher and student:
          `{"must_match": {"vision_cfg.attn_pooler_queries": n}, "hint": ...}`."""
        visual = self.coca.visual
        if module == "image":
            return {"prefix": 1, "grid": tuple(int(g) for g in visual.grid_size)}
        if module == "text":
            return None
        if module == "multimodal":
            if getattr(visual, "attn_pool", None) is not None:
                n = int(visual.attn_pool.query.shape[0])
                return {"must_match": {"vision_cfg.attn_pooler_queries": n},
                        "hint": "the decoder's cross-attention attends to the image attentional pooler's "
                                "outputs, not to patches, so both models need the same vision_cfg.attn_pooler_queries"}
            return {"must_match": {"vision_cfg patch grid": tuple(int(g) for g in visual.grid_size)},
                    "hint": "without an attentional pooler the decoder's cross-attention attends to the image "
                            "patches one to one, so both models need the same patch grid"}
        raise ConfigError(f"CoCa has no module {module!r}; its modules are {', '.join(MODULES)}")

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` -> the tokens the decoder attends to `(B, N, memory_width)`
        (with an attentional pooler its outputs, less the one kept for the contrastive
        embedding: `N = attn_pooler_queries - 1`; without one, the patch tokens).
        Runs the `image` module's layers."""
        return self.coca._encode_image(images)[1]

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Token ids `(B, L)` -> the unimodal text tokens that enter the decoder
        `(B, L, width)` (CoCa's appended class token excluded). Runs the `text` module's layers."""
        return self.coca._encode_text(text)[1]

    def decode(self, memory: torch.Tensor, text_tokens: torch.Tensor) -> torch.Tensor:
        """The multimodal decoder: `text_tokens` `(B, L, width)` (from `encode_text`)
        attend causally to themselves and across to `memory` `(B, M, memory_width)`,
        any number `M` of tokens from any modules (`encode_image`'s, a new module's,
        or both concatenated on dim 1). Returns normalised features `(B, L,
        feature_dim)`. Runs the `multimodal` module's layers."""
        if memory.shape[-1] != self.memory_width:
            raise ConfigError(f"CoCaModel.decode: memory tokens of width {memory.shape[-1]}, but the decoder "
                              f"cross-attends at memory_width = {self.memory_width}; project a new module's "
                              f"tokens to model.memory_width")
        dec = self.coca.text_decoder
        x, n = text_tokens, text_tokens.shape[1]
        for self_block, cross_block in zip(dec.resblocks, dec.cross_attn):
            x = self_block(x, attn_mask=dec.attn_mask[:n, :n])
            x = cross_block(x, k_x=memory, v_x=memory)
        return dec.ln_final(x)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.decode(self.encode_image(batch["image"]), self.encode_text(batch["text"]))

    def vocab_projection(self) -> nn.Parameter:
        """The decoder's `(width, vocab)` output projection (for captioning heads)."""
        return self.coca.text_decoder.text_projection

    def pretraining_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """CoCa's objective through open_clip (`CoCa.forward`, `open_clip.loss.CoCaLoss`):
        `contrastive` (image vs caption embeddings, InfoNCE over the batch) and
        `caption` (next-token cross-entropy, padding ignored), unweighted (CoCa
        weighs them 1 and 2: `pretraining.term_weights`). The caption is the
        captioning batch's `text` (from start-of-text) and its last `labels` token."""
        from open_clip.loss import CoCaLoss

        tokens = torch.cat([batch["text"], batch["labels"][:, -1:]], dim=1)
        out = self.coca(batch["image"], tokens)
        contrastive, caption = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0, pad_id=0)(
            out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"])
        return {"contrastive": contrastive, "caption": caption}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """open_clip's CoCa state dict: what `coca_model.pretrained` / `init_from` load."""
        return self.coca.state_dict()

    def export(self, directory: str, name: str) -> dict[str, Any]:
        """open_clip's own formats, loadable with no OPTIMA code: `<name>.json` (the
        model config; `open_clip.add_model_config(directory)` registers it as
        `name`), `open_clip_model.safetensors` (the CoCa's state dict, open_clip's
        key layout) and `open_clip_config.json` (`create_model('local-dir:...')`).
        Layer counts per module may differ from every built-in config: the
        config written is the one this model was built from."""
        import json

        from safetensors.torch import save_file

        if self.config is None:
            raise ConfigError("this CoCa was built without its open_clip config (CoCaModel(coca, config=...)); "
                              "build it with coca_model to export it")
        if not re.fullmatch(r"[\w.-]+", name):
            raise ConfigError(f"open_clip model name {name!r} may only hold letters, digits, '_', '.' and '-'")
        # open_clip builds a CoCa only from configs with custom_text (as its coca_*.json have)
        config = {**copy.deepcopy(self.config), "custom_text": True}
        weights = os.path.join(directory, EXPORT_WEIGHTS)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.coca.state_dict().items()}, weights,
                  metadata={"format": "pt"})
        with open(os.path.join(directory, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(directory, "open_clip_config.json"), "w", encoding="utf-8") as f:
            json.dump({"model_cfg": config, "preprocess_cfg": {}}, f, indent=2)
        return {"format": "open_clip", "model_name": name,
                "files": [f"{name}.json", EXPORT_WEIGHTS, "open_clip_config.json"],
                "load": (f"import open_clip; open_clip.add_model_config({directory!r}); "
                         f"model = open_clip.create_model({name!r}, pretrained={weights!r})"),
                "wrap": "from optima.plugins.models.coca import CoCaModel; model = CoCaModel(model)"}

    def load_export(self, directory: str) -> None:
        """Load `export`'s `open_clip_model.safetensors` (with open_clip's loader)."""
        import open_clip

        path = os.path.join(directory, EXPORT_WEIGHTS)
        if not os.path.isfile(path):
            raise ConfigError(f"{directory} holds no {EXPORT_WEIGHTS}; is it an `optima export` of a CoCa?")
        try:
            open_clip.load_checkpoint(self.coca, path, strict=True)
        except RuntimeError as e:
            first = " ".join(str(e).strip().splitlines()[:3])[:300]
            raise ConfigError(f"{path} does not fit this CoCa (another architecture than the config's?): "
                              f"{first}") from None


class CoCaExtension(DistillableModel):
    """Base of a model that is CoCa plus modules of its own (video, audio, depth...):
    CoCa's three modules first, then `new_modules()`, so the arms cover all of them.

    A subclass calls `super().__init__(coca)` with a `CoCaModel` (from
    `coca_model(...)`), builds its modules, and implements:

    - `new_modules()`: its `Module`s (named layers: a block whose output is the
      hidden state `(B, T, w)`, and its batch-first `nn.MultiheadAttention`s);
    - `forward(batch)`: usually `self.coca.decode(memory, self.coca.encode_text(...))`
      with the new module's tokens, projected to `self.coca.memory_width`, in the
      memory (in place of `encode_image`'s tokens, or concatenated with them);
    - optionally `new_token_layout(module)` (default None: teacher and student
      tokens matched one to one, so both need the same token count).

    Inherited: `feature_dim`, `distill_modules()`, `token_layout(module)` (CoCa's
    for its modules), `vocab_projection()` (caption heads), `checkpoints`
    (reported by `--dry-run`) and `export` / `load_export` (`optima export`,
    `optima eval --checkpoint EXPORT`): the CoCa as open_clip's files (loadable
    with no OPTIMA code, as `CoCaModel.export` writes them) and, beside them,
    `extension.safetensors` with every other weight of the model (the new
    modules and projections; metadata: the class that holds them). A subclass
    may override `export_extension(directory)` / `load_extension(directory)`
    to write and read its modules in a format of their own. The decoder
    cross-attends to every memory token, so a teacher and student must give it
    the same number of them.
    """

    def __init__(self, coca: CoCaModel):
        super().__init__()
        if not isinstance(coca, CoCaModel):
            raise ConfigError(f"{type(self).__name__} extends a CoCaModel (from coca_model), got {type(coca).__name__}")
        self.coca = coca
        self.feature_dim = coca.feature_dim
        self.checkpoints = coca.checkpoints

    @abc.abstractmethod
    def new_modules(self) -> Sequence[Module]:
        """The modules this model adds to CoCa's, in a fixed order."""

    def new_token_layout(self, module: str) -> dict[str, Any] | None:
        """The token layout of one of `new_modules()` (see `optima.align`); None: one to one."""
        return None

    def distill_modules(self) -> Sequence[Module]:
        return (*self.coca.distill_modules(), *self.new_modules())

    def token_layout(self, module: str) -> dict[str, Any] | None:
        return self.coca.token_layout(module) if module in MODULES else self.new_token_layout(module)

    def vocab_projection(self) -> nn.Parameter:
        return self.coca.vocab_projection()

    def extension_state(self) -> dict[str, torch.Tensor]:
        """The weights this model adds to its CoCa: its state dict without `coca.*`."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("coca.")}

    def export(self, directory: str, name: str) -> dict[str, Any]:
        """The CoCa in open_clip's formats (`CoCaModel.export`), then the
        extension's own weights (`export_extension`); returns `CoCaModel.export`'s
        record with the extension's files added. Plain open_clip loads the CoCa
        part; the whole model needs the plugin: build it as the run's config
        does, then `load_export(directory)`."""
        info = self.coca.export(directory, name)
        files = self.export_extension(directory)
        cls = f"{type(self).__module__}.{type(self).__qualname__}"
        return {**info, "files": [*info["files"], *files], "extension": {"class": cls, "files": files},
                "wrap": f"# the {', '.join(m.name for m in self.new_modules())} module(s) need the plugin of {cls}: "
                        f"build the model as its config does, then model.load_export({directory!r})"}

    def export_extension(self, directory: str) -> list[str]:
        """Write what this model adds to CoCa to `directory`; returns the file names.
        Default: `extension.safetensors`, `extension_state()` in safetensors."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu().clone() for k, v in self.extension_state().items()}
        save_file(tensors, os.path.join(directory, EXTENSION_WEIGHTS),
                  metadata={"format": "pt", "optima_extension": f"{type(self).__module__}.{type(self).__qualname__}"})
        return [EXTENSION_WEIGHTS]

    def load_export(self, directory: str) -> None:
        """Load what `export` wrote: the CoCa with open_clip's loader, then `load_extension`."""
        self.coca.load_export(directory)
        self.load_extension(directory)

    def load_extension(self, directory: str) -> None:
        """Load `export_extension`'s files (default: `extension.safetensors`, every key required)."""
        from safetensors.torch import load_file

        path = os.path.join(directory, EXTENSION_WEIGHTS)
        if not os.path.isfile(path):
            raise ConfigError(f"{directory} holds no {EXTENSION_WEIGHTS}, which {type(self).__name__} needs for "
                              f"its own modules; is it an `optima export` of this model?")
        tensors = load_file(path)
        expected = self.extension_state()
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        wrong = sorted(k for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            raise ConfigError(f"{path} does not fit this {type(self).__name__}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, another shape {wrong[:3]}")
        self.load_state_dict({**self.coca_state(), **tensors})

    def coca_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith("coca.")}


def checkpoint_source(arch: Any, path: str) -> str | None:
    """Where the open_clip checkpoint of the named architecture `arch` saved as
    `path` comes from (its pretrained tag read from the file name), or None (an
    architecture dict, or one open_clip has no weights for)."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(arch) if isinstance(arch, str) else []
    if not tags:
        return None
    name = os.path.basename(path).lower()
    tag = next((t for t in sorted(tags, key=len, reverse=True) if t.lower() in name), tags[0])
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    hub = (cfg.get("hf_hub") or "").strip("/")
    where = f"https://huggingface.co/{hub}, file open_clip_pytorch_model.bin" if hub else cfg.get("url") or "?"
    return f"open_clip's {arch} weights '{tag}': {where}, saved as {path}"


def coca_model(arch: str | Mapping[str, Any] = "coca_ViT-B-32", overrides: Mapping[str, Any] | None = None,
               layers: Sequence[int] | None = None, pretrained: str | None = None,
               device: str | torch.device | None = None, init_from: str | None = None,
               init_from_arch: str | Mapping[str, Any] | None = None,
               random_init: bool | None = None) -> CoCaModel:
    """Build a CoCa by open_clip name or architecture dict.

    Weights, one of:

    - `pretrained`: a checkpoint of exactly this architecture: a local file (open_clip
      checkpoint or plain state dict, `{"state_dict": ...}` too) or an open_clip
      pretrained tag of a named architecture (fetched by open_clip from its hub;
      never used in tests);
    - `init_from`: a checkpoint (file or tag) of a deeper CoCa of the same widths,
      `init_from_arch` (default: `arch` and `overrides` at full depth, i.e. without
      `layers`); each student module's layers are sampled uniformly from the same
      module of it and every other parameter is copied (`init_student_from`). This is
      the paper's student initialisation (CoCa-Tiny from CoCa-Base);
    - random initialisation (open_clip's): the default for an architecture dict
      (small test and quickstart models); a named open_clip architecture (a real
      CoCa size) is never trained from scratch unless `random_init = True` is bound.
      `random_init = False` requires a checkpoint for dicts too.

    `device="meta"` (or building inside `with torch.device("meta")`) allocates no
    memory and loads nothing: parameter counts and the init_from layer sampling and
    shape checks still work. `model.init_report` records the initialisation and
    `model.checkpoints` the checkpoint bindings.
    """
    from open_clip.coca_model import CoCa

    cfg = coca_config(arch, overrides, layers)  # an unknown architecture first: nothing else can be right then
    _check_weights_choice(arch, pretrained, init_from, init_from_arch, random_init)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        meta = torch.empty(0).is_meta  # also true inside `with torch.device("meta")`
        if pretrained:
            _check_checkpoint(arch, pretrained, "pretrained", meta)
        if init_from:
            _check_checkpoint(arch if init_from_arch is None else init_from_arch, init_from, "init_from", meta)
        coca = CoCa(**cfg)
    # open_clip leaves the decoder's vocabulary projection as torch.empty (its
    # init_parameters is never called): garbage memory, which would also make the
    # teacher cache key non-deterministic.
    dec = coca.text_decoder
    if not meta:
        torch.nn.init.normal_(dec.text_projection, std=dec.width ** -0.5)
    model = CoCaModel(coca, cfg)
    model.checkpoints = {k: v for k, v in (("pretrained", pretrained), ("init_from", init_from)) if v}
    model.checkpoint_sources = {k: checkpoint_source(a, v) for k, v, a in (
        ("pretrained", pretrained, arch), ("init_from", init_from, init_from_arch or arch)) if v}
    if pretrained:
        if not meta:
            _load_pretrained(coca, arch, pretrained)
        model.init_report = {"init": "pretrained", "source": pretrained, "loaded": not meta}
    elif init_from:
        source_arch = arch if init_from_arch is None else init_from_arch
        source_cfg = coca_config(arch, overrides) if init_from_arch is None else coca_config(init_from_arch)
        with torch.random.fork_rng(devices=[]), torch.device("meta" if meta else "cpu"):
            source = CoCa(**source_cfg)  # its random init is overwritten; the global RNG is left as it was
        if not meta:
            _load_pretrained(source, source_arch, init_from, "init_from")
        sampled = init_student_from(model, source)
        del source
        model.init_report = {"init": "sampled", "source": init_from,
                             "source_arch": source_arch if isinstance(source_arch, str) else "dict",
                             "layers": sampled, "loaded": not meta}
    else:
        model.init_report = {"init": "random"}
    return model


def _check_weights_choice(arch, pretrained, init_from, init_from_arch, random_init) -> None:
    if pretrained and init_from:
        raise ConfigError(f"bind one of coca_model.pretrained ({pretrained!r}: a checkpoint of this architecture) "
                          f"and coca_model.init_from ({init_from!r}: layers sampled from a deeper CoCa), not both")
    if init_from_arch is not None and not init_from:
        raise ConfigError("coca_model.init_from_arch is the architecture of coca_model.init_from, which is not bound")
    has_checkpoint = bool(pretrained or init_from)
    if random_init is True and has_checkpoint:
        raise ConfigError("coca_model.random_init = True contradicts the bound coca_model."
                          f"{'pretrained' if pretrained else 'init_from'}; unbind one")
    if random_init is False and not has_checkpoint:
        raise ConfigError("coca_model.random_init = False but no checkpoint is bound: bind coca_model.pretrained "
                          "or coca_model.init_from")
    if random_init is None and not has_checkpoint and isinstance(arch, str):
        raise ConfigError(f"coca_model(arch={arch!r}) has no weights bound: bind coca_model.pretrained (a checkpoint "
                          f"of {arch}), coca_model.init_from (a deeper CoCa checkpoint to sample layers from), or "
                          f"coca_model.random_init = True to train it from random initialisation")


def init_student_from(student: nn.Module, source: nn.Module, *, copy_weights: bool = True) -> dict[str, list[int]]:
    """Initialise a shallower CoCa from a deeper one of the same widths.

    Each module's `n_S` student layers come from the source's `n_T` layers of the
    same module at `layer_map(n_S, n_T)` (0-based `l * r - 1`, `r = n_T // n_S`):
    "sampled uniformly" read as every `r`-th layer, ending with the last one when
    `n_T` is a multiple of `n_S` (12 -> 4: 2, 5, 8, 11; 12 -> 2: 5, 11). It is the map
    the distillation losses use, so with a teacher of the same depth ratio each
    student layer starts as the layer it is matched with. A decoder layer's self-
    and cross-attention blocks are copied together. Every other parameter and
    persistent buffer (patch and token embeddings, positional embeddings, class
    embedding and token, ln_pre/ln_post/ln_final, attentional pooler, projections,
    logit_scale) is copied by name.

    `student`, `source`: `CoCaModel`s or open_clip `CoCa`s. Raises ConfigError naming
    the parameters whose names or shapes differ (other widths, patch or image size,
    vocabulary, context length), or the module where the student is deeper. Copies
    nothing when `copy_weights` is False or either model is on the meta device (the checks
    still run). Returns the source layer of each student layer, by module.
    """
    from optima.align import layer_map

    s_model = student.coca if isinstance(student, CoCaModel) else student
    t_model = source.coca if isinstance(source, CoCaModel) else source
    s_sd, t_sd = s_model.state_dict(), t_model.state_dict()
    sampled: dict[str, list[int]] = {}
    for module, prefixes in LAYER_LISTS.items():
        n_s, n_t = len(s_model.get_submodule(prefixes[0])), len(t_model.get_submodule(prefixes[0]))
        try:
            sampled[module] = layer_map(n_s, n_t)
        except ConfigError as e:
            raise ConfigError(f"cannot sample the student's {module} layers from the source CoCa: {e}") from None
    mapping = {}  # student key -> source key
    for key in s_sd:
        m = _LAYER_KEY.match(key)
        mapping[key] = f"{m[1]}.{sampled[_MODULE_OF[m[1]]][int(m[2])]}.{m[3]}" if m else key
    problems = []
    for key, src in mapping.items():
        if src not in t_sd:
            problems.append(f"{src} (not in the source)")
        elif t_sd[src].shape != s_sd[key].shape:
            problems.append(f"{key} student {tuple(s_sd[key].shape)} vs source {tuple(t_sd[src].shape)}")
    problems += [f"{k} (only in the source)" for k in t_sd if k not in s_sd and not _LAYER_KEY.match(k)]
    if problems:
        more = f" and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise ConfigError(f"cannot initialise the student from the source CoCa: {len(problems)} parameter(s) differ "
                          f"in name or shape: {'; '.join(problems[:8])}{more}. The student needs the source's widths, "
                          f"patch and image size, vocabulary and context length; only layer counts may differ")
    if copy_weights and not any(t.is_meta for t in (*s_sd.values(), *t_sd.values())):
        with torch.no_grad():
            for key, src in mapping.items():
                s_sd[key].copy_(t_sd[src])
    return sampled


def _check_checkpoint(arch, checkpoint: str, binding: str, meta: bool) -> None:
    """A local file, or an open_clip pretrained tag of a named `arch` (not fetched here).
    On the meta device (dry run) a missing file is reported by the plan
    (`model.checkpoints`), not raised."""
    if meta or os.path.isfile(checkpoint):
        return
    import open_clip

    if isinstance(arch, str) and checkpoint in open_clip.list_pretrained_tags_by_model(arch):
        return
    raise ConfigError(f"coca_model.{binding}={checkpoint!r} is neither an existing file nor a pretrained tag of "
                      f"{arch if isinstance(arch, str) else 'this architecture dict'!r}; give a local checkpoint path")


def _load_pretrained(coca: nn.Module, arch, pretrained: str, binding: str = "pretrained") -> None:
    import open_clip

    if os.path.isfile(pretrained):
        try:
            open_clip.load_checkpoint(coca, pretrained, strict=True)
        except RuntimeError as e:  # state-dict mismatch
            first = str(e).strip().splitlines()
            raise ConfigError(f"coca_model.{binding}: checkpoint {pretrained} does not fit the CoCa architecture "
                              f"{arch if isinstance(arch, str) else '(dict)'}: {' '.join(first[:3])[:300]}") from None
        return
    if isinstance(arch, str) and pretrained in open_clip.list_pretrained_tags_by_model(arch):
        ref = open_clip.create_model(arch, pretrained=pretrained)
        coca.load_state_dict(ref.state_dict())
        return
    raise ConfigError(f"coca_model.{binding}={pretrained!r} is neither an existing file nor a pretrained "
                      f"tag of {arch!r}; give a local checkpoint path")
