"""One distillation step at the paper's shapes, in one call: the project's OPTIMA
step and layerwise step beside the plain-PyTorch reference step
(`../shared/bench/naive_distill_step.py`, run in this process), as JSON.

Shapes (the reference's): an open_clip CoCa ViT-L/14 teacher (`coca_ViT-L-14`,
24/12/12 layers, random weights: the cost does not depend on them), CoCa-Tiny12
(4/4/4) and Tiny6 (2/2/2) students of CoCa-Base width (`coca_ViT-B-32`'s
layout at patch 14, as the reference builds them), 224 px, 76 text tokens,
batch 128, bf16 autocast on the GPU. Per step: samples/s, peak memory, TFLOP
(torch.utils.flop_counter, forward and backward) and that as a fraction of a
bf16 8192^3 matmul measured in the same process.

- `optima`: `Distiller.train_step` on each of the 7 arms in turn (mean): the
  played arm's layer losses back-propagated, the others computed without
  gradient for the reward (what a run does);
- `layerwise`: every layer's losses back-propagated, none for a reward (the
  layerwise baseline);
- levers, on the OPTIMA step: `optima_fused_adamw` (AdamW(fused=True)),
  `optima_teacher_bf16` (teacher weights in bf16, as the reference holds them),
  `optima_compile` (`--compile`: `distillation.compile = True`; the first steps
  compile, they are not timed);
- `reference`: the reference's own figures (`step_hidden_attn` is the
  comparable step: hidden states and attention maps of every layer).

    python bench/gpu_step.py --out bench/results/            # a GPU: about 5 minutes, ~60 GB
    python bench/gpu_step.py --cpu-smoke --out /tmp/smoke    # CPU, tiny shapes, seconds (CI)

Goals (issue 10): OPTIMA >= 1.6x the reference's samples/s, OPTIMA step time
<= layerwise's, OPTIMA peak memory <= layerwise's; `goals` in the JSON says
which hold.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "shared/bench/naive_distill_step.py"
N_CLASSES = 3


def reference_path(given: str | None) -> Path | None:
    """The reference step: `--reference`, else `../shared/...` beside the checkout
    (or `shared/...` inside it, where a copy of the tree carries it)."""
    candidates = [Path(given)] if given else [ROOT.parent / REFERENCE, ROOT / REFERENCE, ROOT.parent.parent / REFERENCE]
    return next((p for p in candidates if p.is_file()), None)


class Shapes:
    """The reference's shapes: the paper's on a GPU, tiny ones for the CPU smoke run."""

    def __init__(self, smoke: bool, batch: int):
        self.smoke = smoke
        self.batch = 4 if smoke else batch
        self.res, self.patch, self.ctx = (32, 8, 16) if smoke else (224, 14, 76)

    def coca(self, name: str, layers: tuple[int, int, int] | None = None) -> dict:
        """open_clip's config of `name` at these shapes (what the reference's `build` makes)."""
        import open_clip

        cfg = copy.deepcopy(open_clip.get_model_config(name))
        v, t, m = cfg["vision_cfg"], cfg["text_cfg"], cfg["multimodal_cfg"]
        v["image_size"], v["patch_size"] = self.res, self.patch
        t["context_length"] = m["context_length"] = self.ctx
        if layers:
            v["layers"], t["layers"], m["layers"] = layers
        if self.smoke:
            v["width"] = t["width"] = m["width"] = 64
            t["heads"] = m["heads"] = 4
            v["head_width"] = 16
            v["layers"], t["layers"], m["layers"] = layers or (4, 4, 4)
            cfg["embed_dim"] = 64
        cfg.pop("custom_text", None)
        return cfg


def matmul_tflops(device: torch.device) -> float | None:
    """A bf16 8192^3 matmul's TFLOP/s on this GPU (the reference's yardstick)."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - start) / 1e12


def measure(steps: list[Callable[[], None]], device: torch.device, repeats: int, peak: float | None,
            batch: int) -> dict:
    """Time `steps` (one call each, `repeats` rounds after one warm-up round), then
    count one round's FLOPs; per step: ms, samples/s, TFLOP, achieved TFLOP/s,
    peak memory and the fraction of the matmul peak."""
    from torch.utils.flop_counter import FlopCounterMode

    for step in steps:
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        for step in steps:
            step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / (repeats * len(steps))
    out = {"ms": seconds * 1e3, "samples_per_s": batch / seconds}
    if device.type == "cuda":
        out["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2 ** 30
    counter = FlopCounterMode(display=False)
    with counter:
        for step in steps:
            step()
    out["tflop_per_step"] = counter.get_total_flops() / len(steps) / 1e12
    out["achieved_tflops"] = out["tflop_per_step"] / seconds
    if peak:
        out["fraction_of_matmul_peak"] = out["achieved_tflops"] / peak
    return out


def project_rows(shapes: Shapes, teacher_cfg: dict, layers: tuple[int, int, int], device: torch.device,
                 repeats: int, peak: float | None, compile_lever: bool) -> dict:
    """The project's steps for one student (see the module doc)."""
    from optima.align import pair_layouts
    from optima.arms import ArmSpace
    from optima.engine import BatchStream, Distiller, Network
    from optima.plugins.heads.vl_heads import AttentionalPoolerHead
    from optima.plugins.losses.optima_loss import optima_loss
    from optima.plugins.models.coca import coca_model
    from optima.plugins.policies.paper import FixedPolicy
    from optima.plugins.rewards.loss_decrement import combined_reward
    from optima.plugins.tasks.synthetic_ve import SyntheticVisualEntailment

    torch.manual_seed(0)
    t_model = coca_model(teacher_cfg, device=device)
    s_model = coca_model(shapes.coca("coca_ViT-B-32", layers), device=device)
    teacher = Network(t_model, AttentionalPoolerHead(t_model.feature_dim, N_CLASSES)).to(device)
    student = Network(s_model, AttentionalPoolerHead(s_model.feature_dim, N_CLASSES)).to(device)
    task = SyntheticVisualEntailment(image_size=shapes.res, context_length=shapes.ctx, train_size=8, val_size=0,
                                     test_size=0)  # its loss; the batch below is random
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(shapes.batch, 3, shapes.res, shapes.res, generator=g).to(device),
             "text": torch.randint(1, 49000, (shapes.batch, shapes.ctx), generator=g).to(device),
             "label": torch.randint(0, N_CLASSES, (shapes.batch,), generator=g).to(device)}

    def distiller(fused: bool = False, how: bool | str = False) -> Distiller:
        loss = optima_loss(s_model.distill_modules(), t_model.distill_modules(),
                           **pair_layouts(s_model, t_model)).to(device)
        opt = torch.optim.AdamW([*student.parameters(), *loss.parameters()], lr=1e-5,
                                **({"fused": True} if fused else {}))
        arms = ArmSpace(s_model.module_names())
        return Distiller(teacher=teacher, student=student, task=task, loss=loss, arms=arms,
                         policy=FixedPolicy(len(arms)), reward=combined_reward(), optimizer=opt,
                         scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                         stream=BatchStream(task, "train", shapes.batch, 0, device), steps_per_round=1, rounds=1,
                         device=device, amp=device.type == "cuda", compile=how)

    def optima_steps(d: Distiller) -> list[Callable[[], None]]:
        def step(arm: int) -> Callable[[], None]:
            layers_of_arm = d.arm_layers(arm)
            return lambda: d.train_step(batch, layers_of_arm)
        d.need = frozenset(d.reward.terms)
        return [step(k) for k in range(len(d.arms))]

    def layerwise_steps(d: Distiller) -> list[Callable[[], None]]:
        every_layer = d.arm_layers(len(d.arms) - 1)
        d.need = frozenset()
        return [lambda: d.train_step(batch, every_layer)]

    rows: dict[str, dict] = {}
    variants = [("optima", lambda: optima_steps(distiller())), ("layerwise", lambda: layerwise_steps(distiller()))]
    if device.type == "cuda":
        variants.append(("optima_fused_adamw", lambda: optima_steps(distiller(fused=True))))
    variants.append(("optima_teacher_bf16", None))
    if compile_lever:
        variants.append(("optima_compile", lambda: optima_steps(distiller(how=True))))
    for name, make in variants:
        try:
            if name == "optima_teacher_bf16":
                if device.type != "cuda":
                    continue  # bf16 weights are a GPU lever (autocast runs on CUDA only)
                teacher.to(torch.bfloat16)
                steps = optima_steps(distiller())
            else:
                steps = make()
            if name == "optima_compile":
                for step in steps:  # compile outside the timing
                    step()
            rows[name] = measure(steps, device, repeats, peak, shapes.batch)
        except Exception as e:  # a lever that fails here is reported, the others still run
            rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                          "where": traceback.format_exc(limit=-3)}
        finally:
            if name == "optima_teacher_bf16":
                teacher.float()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[name].items()
                                if k != "where"}), flush=True)
    rows["params_M"] = {"student": sum(p.numel() for p in s_model.parameters()) / 1e6}
    return rows


def run_reference(path: Path, smoke: bool, batch: int) -> dict:
    """The reference's `main()` in this process (its shapes from its environment
    variables), its JSON read back."""
    os.environ["BATCH"] = str(batch)
    if smoke:
        os.environ["TINY"] = "1"
    with tempfile.TemporaryDirectory() as out:
        os.environ["OUT"] = out
        spec = importlib.util.spec_from_file_location("naive_distill_step", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main()
        return json.loads(Path(out, "naive_distill_step.json").read_text())


def goals(result: dict) -> dict:
    """Which of the issue's goals hold (None: a figure is missing)."""
    out = {}
    for student in ("tiny12", "tiny6"):
        rows, ref = result.get(student, {}), result.get("reference", {}).get(f"{student}.step_hidden_attn", {})
        opt, lw = rows.get("optima", {}), rows.get("layerwise", {})
        speedup = opt["samples_per_s"] / ref["samples_per_s"] if "samples_per_s" in opt and ref else None
        out[student] = {
            "optima_over_reference_samples_per_s": speedup,
            "optima_at_least_1.6x_reference": None if speedup is None else speedup >= 1.6,
            "optima_time_at_most_layerwise": opt["ms"] <= lw["ms"] if "ms" in opt and "ms" in lw else None,
            "optima_memory_at_most_layerwise": opt["peak_mem_GiB"] <= lw["peak_mem_GiB"]
            if "peak_mem_GiB" in opt and "peak_mem_GiB" in lw else None,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, one timed round (CI)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (a round: one step per arm)")
    p.add_argument("--compile", action="store_true", help="also time the OPTIMA step under torch.compile")
    p.add_argument("--reference", help=f"the reference step (default: ../{REFERENCE} beside the checkout)")
    p.add_argument("--out", help="folder for gpu_step.json (or gpu_step_<card>.json on a GPU)")
    args = p.parse_args()

    if args.cpu_smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        sys.exit("gpu_step.py: no GPU here; --cpu-smoke runs tiny shapes on the CPU")
    shapes = Shapes(args.cpu_smoke, args.batch)
    repeats = 1 if args.cpu_smoke else args.repeats
    started = time.time()
    peak = matmul_tflops(device)
    result: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or 'cpu'})",
        "torch": torch.__version__, "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": args.cpu_smoke,
        "shapes": {"batch": shapes.batch, "image_size": shapes.res, "patch": shapes.patch, "context": shapes.ctx,
                   "teacher": "coca_ViT-L-14", "students": "coca_ViT-B-32 layout at the teacher's patch size",
                   "precision": "bf16 autocast" if device.type == "cuda" else "float32"},
        "matmul_tflops": peak,
    }
    teacher_cfg = shapes.coca("coca_ViT-L-14")
    for student, layers in (("tiny12", (4, 4, 4)), ("tiny6", (2, 2, 2))):
        print(f"== {student}", flush=True)
        result[student] = project_rows(shapes, teacher_cfg, layers, device, repeats, peak, args.compile)
    path = reference_path(args.reference)
    if path is None:
        result["reference"] = {"error": f"not found (../{REFERENCE} beside the checkout, or --reference)"}
    else:
        print(f"== reference {path}", flush=True)
        try:
            result["reference"] = run_reference(path, args.cpu_smoke, shapes.batch)
        except Exception as e:
            result["reference"] = {"error": f"{type(e).__name__}: {e}", "where": traceback.format_exc(limit=-3)}
    result["goals"] = goals(result)
    result["seconds"] = round(time.time() - started, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        name = "gpu_step.json" if device.type != "cuda" else \
            "gpu_step_" + "".join(c if c.isalnum() else "_" for c in result["device"]).strip("_") + ".json"
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, name).write_text(text + "\n")


if __name__ == "__main__":
    main()
