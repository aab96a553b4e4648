"""Bring a teacher's token axes to the student's token layout (model-agnostic).

Teacher and student may differ in width (the loss's projections handle that),
depth (the layer map) and, for image modules, patch size: open_clip's ViT-B/32
sees a 7x7 patch grid at 224 px, ViT-L/14 a 16x16 one. Tokens are then matched
as follows:

- prefix tokens (a ViT's class token) are matched one to one, never pooled;
- the teacher's patch grid is brought to the student's grid by 2-D adaptive
  average pooling (`F.adaptive_avg_pool2d`'s windows; for a divisible grid, the
  mean of each `k x k` block);
- a module without a grid (text tokens, decoder tokens) is matched one to one.

Attention probability maps `(B, L_query, L_key)` get the same windows on both
axes, but the two axes are not pooled alike:

- query axis: AVERAGED over a window. A row is a distribution over keys; the mean
  of distributions is a distribution, and it is the attention of the "average
  query" of the student's cell (the same window as the pooled hidden state);
- key axis: SUMMED over a window. The student's key cell stands for the teacher's
  patches it covers, so its probability is their total mass. Averaging keys and
  renormalising rows instead would be wrong: the class-token column is not pooled,
  so dividing the patch columns by the window size and renormalising inflates the
  class token's share (`p_cls / (p_cls + (1 - p_cls) / k)` instead of `p_cls`).
  Where adaptive windows overlap (non-divisible grids, e.g. 16 -> 7: windows of 3
  or 4 patches sharing one), a teacher key held by several windows gives each an
  equal share of its mass, so every row still sums to exactly 1 with no
  renormalisation; for a divisible grid this is the plain block sum.

The pooling is a separable linear map per grid axis, so it works on any tensor
axis and keeps gradients. A student grid finer than the teacher's is allowed: the
same windows then repeat teacher patches (queries) and split their mass (keys).

A *token layout* describes one module's token axis:

    None                                   tokens matched one to one
    {"prefix": 1, "grid": (7, 7)}          1 leading token, then a 7x7 patch grid (row-major)
    {"must_match": {"vision_cfg.attn_pooler_queries": 256}, "hint": "..."}
                                           one to one; the named values must agree between
                                           teacher and student (checked when the loss is built)

Keys: `prefix` (int >= 0, default 0), `grid` ((rows, cols) or None), `must_match`
(name -> value), `hint` (text added to alignment errors of the module). A model
declares layouts with an optional method `token_layout(module_name)`; see
`token_layouts`.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import torch

from optima.errors import ConfigError

Layout = Mapping[str, Any] | None
_KEYS = {"prefix", "grid", "must_match", "hint"}


def token_layouts(model: Any) -> dict[str, Layout] | None:
    """`{module: model.token_layout(module)}` for a model that declares layouts
    (duck-typed optional method), else None (every module one to one)."""
    fn = getattr(model, "token_layout", None)
    if fn is None:
        return None
    return {name: fn(name) for name in model.module_names()}


def layer_map(n_student: int, n_teacher: int) -> list[int]:
    """0-based teacher layer for each student layer: `g(l) = l * r` (1-based),
    `r = n_teacher // n_student` (rounded down when not an integer)."""
    if not 0 < n_student <= n_teacher:
        raise ConfigError(f"a student module needs 1..{n_teacher} layers (the teacher's count), got {n_student}")
    r = n_teacher // n_student
    return [(l + 1) * r - 1 for l in range(n_student)]


def pair_layouts(student: Any, teacher: Any) -> dict[str, Any]:
    """The loss's layout keywords (`student_layouts`, `teacher_layouts`) for a
    student/teacher pair that both declare layouts, else `{}` (one to one)."""
    s, t = token_layouts(student), token_layouts(teacher)
    if s is None or t is None:
        return {}
    return {"student_layouts": s, "teacher_layouts": t}


def normalize_layout(layout: Layout, where: str = "") -> dict[str, Any] | None:
    """Checks a layout and fills defaults; None stays None."""
    if layout is None:
        return None
    if not isinstance(layout, Mapping):
        raise ConfigError(f"{where}token layout must be None or a dict, got {layout!r}")
    unknown = set(layout) - _KEYS
    if unknown:
        raise ConfigError(f"{where}token layout has unknown keys {sorted(unknown)}; valid: {sorted(_KEYS)}")
    prefix = layout.get("prefix", 0)
    if not isinstance(prefix, int) or prefix < 0:
        raise ConfigError(f"{where}token layout prefix must be an integer >= 0, got {prefix!r}")
    grid = layout.get("grid")
    if grid is not None:
        grid = tuple(grid)
        if len(grid) != 2 or not all(isinstance(g, int) and g > 0 for g in grid):
            raise ConfigError(f"{where}token layout grid must be (rows, cols) of positive integers, got {grid!r}")
    return {"prefix": prefix, "grid": grid, "must_match": dict(layout.get("must_match") or {}),
            "hint": layout.get("hint") or ""}


def check_pair(module: str, teacher: Layout, student: Layout) -> tuple[dict | None, dict | None]:
    """Static checks of one module's teacher and student layouts (before any step).

    Returns both layouts normalised. Raises ConfigError if one side has a patch grid
    and the other not, the prefixes differ, or a `must_match` value differs."""
    t = normalize_layout(teacher, f"teacher module {module!r}: ")
    s = normalize_layout(student, f"student module {module!r}: ")
    t_grid, s_grid = (t or {}).get("grid"), (s or {}).get("grid")
    if (t_grid is None) != (s_grid is None):
        raise ConfigError(f"module {module!r}: the teacher's tokens are {_describe(t)} but the student's are "
                          f"{_describe(s)}; both need a patch grid, or neither")
    if t_grid is not None and t["prefix"] != s["prefix"]:
        raise ConfigError(f"module {module!r}: teacher has {t['prefix']} prefix token(s) before its patch grid, "
                          f"the student {s['prefix']}; prefix tokens are matched one to one")
    t_must, s_must = (t or {}).get("must_match", {}), (s or {}).get("must_match", {})
    for name in sorted(set(t_must) | set(s_must)):
        if t_must.get(name, "<unset>") != s_must.get(name, "<unset>"):
            hint = _hint(t, s)
            raise ConfigError(f"module {module!r}: teacher {name}={t_must.get(name, '<unset>')!r} but student "
                              f"{name}={s_must.get(name, '<unset>')!r}; these tokens are matched one to one, so the "
                              f"two must agree{hint}")
    return t, s


def _describe(layout: dict | None) -> str:
    if layout is None or layout["grid"] is None:
        return "matched one to one (no patch grid)"
    return f"{layout['prefix']} prefix token(s) + a {layout['grid'][0]}x{layout['grid'][1]} patch grid"


def _hint(*layouts: dict | None) -> str:
    hints = dict.fromkeys(l["hint"] for l in layouts if l and l["hint"])
    return "".join(f" ({h})" for h in hints)


@functools.lru_cache(maxsize=256)
def window_matrix(n_in: int, n_out: int, mode: str, dtype=torch.float32, device=None) -> torch.Tensor:
    """`(n_out, n_in)` linear pooling of one grid axis with adaptive-pooling windows
    `[floor(j n_in / n_out), ceil((j + 1) n_in / n_out))` (those of `F.adaptive_avg_pool*`).

    `mode="mean"`: rows sum to 1 (average over the window, = adaptive average pooling);
    `mode="sum"`: columns sum to 1 (each input's mass shared equally by the windows
    holding it; the plain window sum where windows do not overlap). Cached: do not
    modify the result."""
    member = torch.zeros(n_out, n_in, dtype=torch.float64)
    for j in range(n_out):
        member[j, (j * n_in) // n_out: -((-(j + 1) * n_in) // n_out)] = 1.0
    if mode == "mean":
        w = member / member.sum(1, keepdim=True)
    elif mode == "sum":
        w = member / member.sum(0, keepdim=True)
    else:
        raise ValueError(f"mode must be 'mean' or 'sum', got {mode!r}")
    return w.to(dtype=dtype, device=device)


def align_axis(x: torch.Tensor, dim: int, teacher: Layout, student: Layout, mode: str = "mean",
               where: str = "tensor") -> torch.Tensor:
    """Axis `dim` of `x` laid out as `teacher` -> the `student` layout: prefix tokens
    kept, the patch grid pooled (`mode` "mean" or "sum", see `window_matrix`).
    Layouts without a grid leave the axis as is (one to one)."""
    t, s = normalize_layout(teacher), normalize_layout(student)
    t_grid, s_grid = (t or {}).get("grid"), (s or {}).get("grid")
    if t_grid is None and s_grid is None:
        return x
    if t_grid is None or s_grid is None:
        raise ConfigError(f"{where}: the teacher's tokens are {_describe(t)} but the student's are {_describe(s)}")
    if t["prefix"] != s["prefix"]:
        raise ConfigError(f"{where}: teacher has {t['prefix']} prefix token(s), the student {s['prefix']}")
    p, (th, tw), (sh, sw) = t["prefix"], t["grid"], s["grid"]
    n = x.shape[dim]
    if n != p + th * tw:
        raise ConfigError(f"{where}: the teacher's token axis has {n} tokens, but its layout says {p} prefix + "
                          f"{th}x{tw} patches = {p + th * tw} (patch dropout or a different image size?)"
                          f"{_hint(t, s)}")
    if (th, tw) == (sh, sw):
        return x
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype).movedim(dim, -1)
    head, grid = x[..., :p], x[..., p:].unflatten(-1, (th, tw))
    w_h = window_matrix(th, sh, mode, dtype, x.device)
    w_w = window_matrix(tw, sw, mode, dtype, x.device)
    pooled = torch.einsum("...hw,ih,jw->...ij", grid, w_h, w_w).flatten(-2)
    return torch.cat([head, pooled], -1).movedim(-1, dim)


def align_hidden(hidden: torch.Tensor, teacher: Layout, student: Layout, where: str = "hidden state") -> torch.Tensor:
    """Teacher hidden states `(B, tokens, D)` -> the student's tokens: class token
    kept, patch grid average-pooled onto the student's grid."""
    return align_axis(hidden, -2, teacher, student, "mean", where)


def align_attention(attn: torch.Tensor, teacher: Layout, student: Layout,
                    where: str = "attention") -> torch.Tensor:
    """Teacher attention probabilities `(B, queries, keys)` of a self-attention over
    the module's tokens -> the student's grid on both axes: queries averaged, keys
    summed (the four blocks cls->cls, cls->patches, patches->cls, patches->patches
    follow from keeping the prefix on each axis). Rows keep summing to 1."""
    attn = align_axis(attn, -2, teacher, student, "mean", where + " (queries)")
    return align_axis(attn, -1, teacher, student, "sum", where + " (keys)")

