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
  gradient for the reward (what a run does); with `amp` on a GPU the teacher
  runs as a bf16 copy outside autocast (`optima.engine.teacher_copy`);
- `layerwise`: every layer's losses back-propagated, none for a reward (the
  layerwise baseline);
- levers, on the OPTIMA step: `optima_teacher_autocast` (the teacher's float32
  weights under autocast, as before the bf16 copy), `optima_fused_adamw`
  (AdamW(fused=True); GPU only), and with `--compile`: `optima_compile_teacher`
  (only the teacher's forward under `torch.compile`: one graph for every arm,
  since the teacher records the same layers whatever the arm; a lever of this
  bench, not yet a binding) and `optima_compile` (`distillation.compile = True`:
  student and teacher); the first steps compile, they are not timed. On a GPU
  they compile with inductor; `--cpu-smoke` compiles with the `aot_eager`
  backend (dynamo and AOT autograd trace the step, no code generation: seconds,
  and what can break in tracing does);
- `reference`: the reference's own figures (`step_hidden_attn` is the
  comparable step: hidden states and attention maps of every layer), its FLOPs
  counted like ours (`CompleteFlopCounter`).

Sections run in the order reference, tiny12, tiny6; `--only tiny12,reference`
and `--rows optima,layerwise` choose what runs. The JSON is rewritten after
every section and row (`"complete": false` until the end), so a call cut short
keeps what it measured. `--profile` adds a torch.profiler table of one OPTIMA
round per student (`gpu_step_profile_<student>_<card>.txt`).

    python bench/gpu_step.py --out bench/results/            # a GPU: about 2 minutes, ~30 GB
    python bench/gpu_step.py --compile --profile --out DIR   # and torch.compile: about 5 minutes
    python bench/gpu_step.py --cpu-smoke --out /tmp/smoke    # CPU, tiny shapes, seconds (CI)

Goals (issue 22): OPTIMA >= 1.0x the reference's samples/s, a compiled row
>= 1.3x, OPTIMA peak memory <= layerwise's (issue 10 asked 1.6x, and OPTIMA's
step time <= layerwise's); `goals` in the JSON says which hold.
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

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


class CompleteFlopCounter:
    """`torch.utils.flop_counter.FlopCounterMode` with `nn.MultiheadAttention`'s
    fast path off while it counts (same spelling: `with CompleteFlopCounter() as c:
    ...; c.get_total_flops()`).

    In eval mode without grad or autocast, MHA runs one fused op
    (`_native_multi_head_attention`) that the counter sees but has no formula for,
    so its projections and attention count 0. The reference's bf16 teacher takes
    that path in its ViT blocks (not in the text blocks: float masks rule it out),
    so its counted teacher forward missed 7.5 of 27.4 TFLOP at the paper's shapes.
    With the path off while counting, every step is counted alike; the timed
    steps are left as they are."""

    def __init__(self, display: bool = False):
        from torch.utils.flop_counter import FlopCounterMode

        self.counter = FlopCounterMode(display=display)

    def get_total_flops(self) -> int:
        return self.counter.get_total_flops()

    def __enter__(self) -> "CompleteFlopCounter":
        self.was = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        self.counter.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            return self.counter.__exit__(*exc)
        finally:
            torch.backends.mha.set_fastpath_enabled(self.was)


def measure(steps: list[Callable[[], None]], device: torch.device, repeats: int, peak: float | None,
            batch: int, tflop: float | None = None) -> dict:
    """Time `steps` (one call each, `repeats` rounds after one warm-up round), then
    count one round's FLOPs (`CompleteFlopCounter`) unless `tflop` per step is
    given; per step: ms, samples/s, TFLOP, achieved TFLOP/s, peak memory and the
    fraction of the matmul peak."""
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
    if tflop is None:
        with CompleteFlopCounter() as counter:
            for step in steps:
                step()
        tflop = counter.get_total_flops() / len(steps) / 1e12
    out["tflop_per_step"] = tflop
    out["achieved_tflops"] = out["tflop_per_step"] / seconds
    if peak:
        out["fraction_of_matmul_peak"] = out["achieved_tflops"] / peak
    return out


#: The project's rows, in the order they run (see the module doc).
ROWS = ("optima", "layerwise", "optima_teacher_autocast", "optima_fused_adamw", "optima_compile_teacher",
        "optima_compile")
COMPILE_ROWS = ("optima_compile_teacher", "optima_compile")


def project_rows(shapes: Shapes, teacher_cfg: dict, layers: tuple[int, int, int], device: torch.device,
                 repeats: int, peak: float | None, rows: Sequence[str], done: Callable[[str, dict], None],
                 profile_to: Path | None = None) -> dict:
    """The project's `rows` for one student (see the module doc); `done(name, row)`
    after each (the caller saves what it has). `profile_to`: also write a
    torch.profiler table of one OPTIMA round (one step per arm) there."""
    from optima.align import pair_layouts
    from optima.arms import ArmSpace
    from optima.engine import BatchStream, Distiller, Network, compiled
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

    backend = "aot_eager" if shapes.smoke else True  # see the module doc

    def distiller(row: str) -> Distiller:
        loss = optima_loss(s_model.distill_modules(), t_model.distill_modules(),
                           **pair_layouts(s_model, t_model)).to(device)
        opt = torch.optim.AdamW([*student.parameters(), *loss.parameters()], lr=1e-5,
                                **({"fused": True} if row == "optima_fused_adamw" else {}))
        arms = ArmSpace(s_model.module_names())
        d = Distiller(teacher=teacher, student=student, task=task, loss=loss, arms=arms,
                      policy=FixedPolicy(len(arms)), reward=combined_reward(), optimizer=opt,
                      scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                      stream=BatchStream(task, "train", shapes.batch, 0, device), steps_per_round=1, rounds=1,
                      device=device, amp=device.type == "cuda", compile=backend if row == "optima_compile" else False,
                      teacher_dtype=torch.float32 if row == "optima_teacher_autocast" else None)
        if row == "optima_compile_teacher":
            d.teacher_forward = compiled(d.teacher_run, backend)
        if row == "layerwise":  # every layer's losses back-propagated, none for a reward
            every_layer = d.arm_layers(len(d.arms) - 1)
            d.need = frozenset()
            d.bench_steps = [lambda: d.train_step(batch, every_layer)]
        else:  # one step per arm
            d.bench_steps = [functools.partial(d.train_step, batch, d.arm_layers(k)) for k in range(len(d.arms))]
        return d

    out: dict[str, dict] = {"params_M": {"student": sum(p.numel() for p in s_model.parameters()) / 1e6}}
    for name in rows:
        if name == "optima_fused_adamw" and device.type != "cuda":
            continue  # fused AdamW is a GPU kernel
        d = None
        try:
            d = distiller(name)
            compile_s = None
            if name in COMPILE_ROWS:
                started = time.perf_counter()
                for step in d.bench_steps:  # compile outside the timing
                    step()
                compile_s = time.perf_counter() - started
            # a compiled step computes the eager one's FLOPs; counting under a dispatch
            # mode would only make dynamo trace it again
            same = out.get("optima", {}).get("tflop_per_step") if name in COMPILE_ROWS else None
            out[name] = measure(d.bench_steps, device, repeats, peak, shapes.batch, same)
            if compile_s is not None:
                out[name].update(compile_s=compile_s, backend="inductor" if backend is True else backend)
            if name == "optima" and profile_to is not None:
                out[name]["profile"] = profile(d.bench_steps, device, profile_to)
        except Exception as e:  # a lever that fails here is reported, the others still run
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                         "where": traceback.format_exc(limit=-3)}
        finally:
            if d is not None:
                d.close()  # its hooks off the shared student
            del d
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out[name].items()
                                if k != "where"}), flush=True)
        done(name, out)
    return out


def profile(steps: list[Callable[[], None]], device: torch.device, path: Path) -> str:
    """One call of each step under torch.profiler; the table of the ops with the
    most device (else CPU) time, written to `path`; returns the path."""
    from torch.profiler import ProfilerActivity, profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profiler(activities=activities) as prof:
        for step in steps:
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"one OPTIMA round ({len(steps)} steps, one per arm), ops by {key}\n"
                    + prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=60) + "\n")
    return path.name


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
        module.FlopCounterMode = CompleteFlopCounter  # its timings untouched, its FLOPs all counted
        module.main()
        return json.loads(Path(out, "naive_distill_step.json").read_text())


def goals(result: dict) -> dict:
    """Which of the issues' goals hold (None: a figure is missing)."""
    out = {}
    for student in ("tiny12", "tiny6"):
        rows, ref = result.get(student, {}), result.get("reference", {}).get(f"{student}.step_hidden_attn", {})
        opt, lw = rows.get("optima", {}), rows.get("layerwise", {})
        speedup = opt["samples_per_s"] / ref["samples_per_s"] if "samples_per_s" in opt and ref else None
        compiled_rates = [rows[r]["samples_per_s"] for r in COMPILE_ROWS if "samples_per_s" in rows.get(r, {})]
        compiled = max(compiled_rates) / ref["samples_per_s"] if compiled_rates and ref else None
        out[student] = {
            "optima_over_reference_samples_per_s": speedup,
            "optima_at_least_1.0x_reference": None if speedup is None else speedup >= 1.0,
            "optima_at_least_1.6x_reference": None if speedup is None else speedup >= 1.6,
            "best_compiled_over_reference_samples_per_s": compiled,
            "compiled_at_least_1.3x_reference": None if compiled is None else compiled >= 1.3,
            "optima_time_at_most_layerwise": opt["ms"] <= lw["ms"] if "ms" in opt and "ms" in lw else None,
            "optima_memory_at_most_layerwise": opt["peak_mem_GiB"] <= lw["peak_mem_GiB"]
            if "peak_mem_GiB" in opt and "peak_mem_GiB" in lw else None,
        }
    return out


#: in the order they run: the reference first, so that a call cut short has it
SECTIONS = ("reference", "tiny12", "tiny6")
STUDENTS = {"tiny12": (4, 4, 4), "tiny6": (2, 2, 2)}


def names(given: str | None, known: Sequence[str], flag: str) -> list[str]:
    """A comma-separated selection from `known` (all of them if not given), in `known`'s order."""
    if given is None:
        return list(known)
    chosen = [n.strip() for n in given.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown or not chosen:
        sys.exit(f"gpu_step.py: {flag} {given!r}: choose from {', '.join(known)}")
    return [n for n in known if n in chosen]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, one timed round (CI)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (a round: one step per arm)")
    p.add_argument("--only", help=f"sections to run, comma-separated (default: all of {', '.join(SECTIONS)})")
    p.add_argument("--rows", help=f"the project's rows, comma-separated (default: all of {', '.join(ROWS)} "
                                  "but the compile rows)")
    p.add_argument("--compile", action="store_true", help="also the compile rows (optima_compile_teacher, "
                                                          "optima_compile)")
    p.add_argument("--profile", action="store_true",
                   help="also write a torch.profiler table of one OPTIMA round per student (gpu_step_profile_*.txt)")
    p.add_argument("--reference", help=f"the reference step (default: ../{REFERENCE} beside the checkout)")
    p.add_argument("--out", help="folder for gpu_step.json (or gpu_step_<card>.json on a GPU), "
                                 "written after every row: a run cut short keeps what it measured")
    args = p.parse_args()
    sections = names(args.only, SECTIONS, "--only")
    rows = names(args.rows, ROWS, "--rows") if args.rows else [r for r in ROWS if r not in COMPILE_ROWS]
    if args.compile:
        rows += [r for r in COMPILE_ROWS if r not in rows]

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
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "smoke": args.cpu_smoke, "complete": False,
        "shapes": {"batch": shapes.batch, "image_size": shapes.res, "patch": shapes.patch, "context": shapes.ctx,
                   "teacher": "coca_ViT-L-14", "students": "coca_ViT-B-32 layout at the teacher's patch size",
                   "precision": "bf16 autocast, bf16 teacher copy" if device.type == "cuda" else "float32"},
        "flops": "torch.utils.flop_counter with nn.MultiheadAttention's fast path off while counting "
                 "(CompleteFlopCounter): every step counted alike",
        "matmul_tflops": peak,
    }
    suffix = "" if device.type != "cuda" else \
        "_" + "".join(c if c.isalnum() else "_" for c in result["device"]).strip("_")
    out = Path(args.out) if args.out else None

    def save() -> None:
        result["goals"] = goals(result)
        result["seconds"] = round(time.time() - started, 1)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / f".gpu_step{suffix}.json.tmp"
            tmp.write_text(json.dumps(result, indent=1) + "\n")
            tmp.replace(out / f"gpu_step{suffix}.json")  # whole or not at all

    if "reference" in sections:
        path = reference_path(args.reference)
        if path is None:
            result["reference"] = {"error": f"not found (../{REFERENCE} beside the checkout, or --reference)"}
        else:
            print(f"== reference {path}", flush=True)
            try:
                result["reference"] = run_reference(path, args.cpu_smoke, shapes.batch)
            except Exception as e:
                result["reference"] = {"error": f"{type(e).__name__}: {e}", "where": traceback.format_exc(limit=-3)}
        gc.collect()  # its models (held in cycles by their hooks) off the GPU before our rows' peak memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    teacher_cfg = shapes.coca("coca_ViT-L-14")
    for student in [s for s in sections if s in STUDENTS]:
        print(f"== {student}", flush=True)
        table = out / f"gpu_step_profile_{student}{suffix}.txt" if args.profile and out else None

        def done(_name: str, rows_so_far: dict, student: str = student) -> None:
            result[student] = rows_so_far
            save()

        result[student] = project_rows(shapes, teacher_cfg, STUDENTS[student], device, repeats, peak, rows, done,
                                       table)
    result["complete"] = True
    save()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
