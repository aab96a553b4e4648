"""The input pipeline, measured in one run: images/s of the loader (SNLI-VE task,
open_clip's train transforms, BPE tokens) for 0, 1, 2 ... DataLoader workers
on generated Flickr-sized JPEGs (500x375, about 83 kB), and the time of an
OPTIMA distillation step fed by the loader against the same step on batches
already in memory.

    python bench/input_pipeline.py                            # CPU: ~3 minutes on 2 cores
    python bench/input_pipeline.py --workers 1 2 4 --out bench/results/
    python bench/input_pipeline.py --out bench/results/       # a GPU: ~1-2 minutes
    python bench/input_pipeline.py --smoke                    # the GPU mode's code, tiny, on the CPU (CI)

On the CPU (224 px, 76 tokens, batch 32) the step is a small one (teacher
4/4/4, student 2/2/2 layers of `--width`, the every-module arm). On a GPU
(`--device cuda`, the default when there is one) it is the paper-shape step
of `bench/gpu_step.py` (CoCa ViT-L/14 teacher, Tiny12 student, batch 128,
224 px, 76 tokens, bf16 autocast, the 7 arms in turn), fed by `--workers`
workers (default: the CPUs available less one) against batches already on the
GPU; issue 10's goal is a ratio <= 1.05 (`goal_ratio_at_most_1.05`). It
writes `input_pipeline_<card>.json` into a folder `--out`.

Figures are ratios of things measured in the same run: `speedup_over_*` is a
variant's images/s over a synchronous loader's (0 workers: the training
process decodes, with the task's `load_threads` pool or serially, and
transforms); `cpu_ms_per_image` is the CPU time all its processes and threads
spent per image, and `cores_used` the cores they got (rate x CPU time): on a
shared machine the scheduler gives each session a share of the cores (Linux
autogroups), which caps what more processes can add; `*_ratio` is the step time
with the loader over the step time on batches in memory (1.0: the step never
waits for data). On a machine whose cores also run the step (a CPU run),
workers and step share the cores; on a GPU node the step runs on the GPU.

Where a worker's time goes (224 px, batch 32, CPU ms per image, measured with
cProfile and /proc on the busy 2-core machine, so +-10%): JPEG decode ~1.0,
open_clip's random-resized-crop (PIL bicubic, antialiased) ~1.35, BPE tokens
~0.04, ToTensor + Normalize ~0.3 per image or ~0.1 on a whole batch. Workers
used to send float32 images: moving a 19 MB batch into shared memory cost a
worker ~0.5 CPU ms per image (page faults on fresh shared memory, mostly
system time), which made 1 worker slower than the serial loader and held 2
workers to ~1.5x it. Workers now send uint8 pixels (a quarter of the bytes,
made in shared memory) and the training process normalises the batch on its
device (`BatchSource.packed_shard`/`unpack`). Measured A/B in one session
(old and new code alternately, loader only, 8 batches; serial / 1 worker /
2 workers): before 2.89-3.13 / 3.44-3.67 / 3.75-4.10, after 2.70-2.77 /
2.89-3.01 / 3.12-3.20 CPU ms per image. What is left with 2 workers, ~0.4
over serial: ~0.2 in the training process (receiving a batch, normalising
it) and ~0.15 in the workers (shared memory, pickling). With 2 cores fully
used, the most 2 workers can give is 2 x 2.75 / 3.15 = ~1.75x the serial
loader by CPU times; measured on the quiet machine: 1.76x (README, "Speed").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from itertools import cycle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from optima.arms import ArmSpace
from optima.data import BatchStream, available_cpus
from optima.engine import Distiller, Network
from optima.model_card import cpu_name
from optima.plugins.heads.vl_heads import AttentionalPoolerHead
from optima.plugins.losses.optima_loss import optima_loss
from optima.plugins.models.coca import coca_model
from optima.plugins.policies.paper import FixedPolicy
from optima.plugins.rewards.loss_decrement import combined_reward
from optima.plugins.tasks.snli_ve import LABELS, SnliVe


def make_flickr_like(root: Path, n: int, seed: int = 0) -> Path:
    """`n` 500x375 JPEGs (gradients plus noise: ~83 kB at quality 90, like
    Flickr30k's) and SNLI-VE annotation files naming them."""
    rng = np.random.default_rng(seed)
    images = root / "flickr30k_images"
    images.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:375, 0:500]
    rows = []
    for k in range(n):
        base = np.stack([(x * 0.4 + k * 30) % 256, (y * 0.6 + 50 + k) % 256, ((x + y) * 0.3) % 256], -1)
        pixels = np.clip(base + rng.normal(0, 16, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{k}.jpg", quality=90)
        rows.append({"Flikr30kID": f"{k}.jpg", "gold_label": LABELS[k % 3],
                     "sentence2": f"A photo of thing number {k} on a sunny day in the park."})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    for name in ("snli_ve_train.jsonl", "snli_ve_dev.jsonl", "snli_ve_test.jsonl"):
        (root / name).write_text(text)
    return root


def loader_rate(task, batch: int, workers: int, batches: int, warmup: int,
                device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """Images/s of a stream with `workers` workers after `warmup` batches (on
    `device`: on a GPU pinned, copied and normalised there), and the CPU time
    per image of the processes making them (this one, all its threads, and its
    workers) over the same batches: on a busy machine the rate also depends on
    how much of the cores the scheduler gives this session, the CPU time does not."""
    stream = BatchStream(task, "train", batch, 0, device, workers=workers)
    for _ in range(warmup):
        next(stream)
    _sync(device)
    pids = [str(os.getpid()), *_children()]
    cpu, start = _cpu_seconds(pids), time.perf_counter()
    for _ in range(batches):
        next(stream)
    _sync(device)
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds(pids) - cpu
    stream.close()
    return batches * batch / elapsed, cpu / (batches * batch) * 1e3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _children() -> list[str]:
    """This process's children (its DataLoader workers), from /proc (Linux)."""
    me, out = str(os.getpid()), []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == me:
                out.append(pid)
        except (OSError, IndexError):  # gone meanwhile
            continue
    return out


def _cpu_seconds(pids: list[str]) -> float:
    """User + system CPU seconds of processes `pids` (each with all its threads)."""
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def coca(width: int, layers: int) -> dict:
    heads = max(1, width // 32)
    return {"embed_dim": width,
            "vision_cfg": {"image_size": 224, "patch_size": 32, "width": width, "layers": layers, "head_width": 32,
                           "attentional_pool": True, "attn_pooler_queries": 32, "attn_pooler_heads": heads,
                           "output_tokens": True},
            "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": width, "heads": heads, "layers": layers,
                         "embed_cls": True, "output_tokens": True},
            "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": width, "heads": heads,
                               "layers": layers, "attn_pooler_heads": heads}}


def step_times(task, batch: int, width: int, workers: list[int], steps: int) -> dict:
    """ms per OPTIMA step (teacher 4/4/4, student 2/2/2 layers, `width`) on batches
    in memory, and fed by a stream with each worker count."""
    torch.manual_seed(0)
    t_model, s_model = coca_model(coca(width, 4)), coca_model(coca(width, 2))
    teacher = Network(t_model, AttentionalPoolerHead(width, 3))
    student = Network(s_model, AttentionalPoolerHead(width, 3))
    loss = optima_loss(s_model.distill_modules(), t_model.distill_modules())
    opt = torch.optim.AdamW([*student.parameters(), *loss.parameters()], lr=1e-4)
    arms = ArmSpace(s_model.module_names())
    cpu = torch.device("cpu")
    d = Distiller(teacher=teacher, student=student, task=task, loss=loss, arms=arms, policy=FixedPolicy(len(arms)),
                  reward=combined_reward(), optimizer=opt,
                  scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                  stream=BatchStream(task, "train", batch, 0, cpu), steps_per_round=1, rounds=1, device=cpu)
    layers = d.arm_layers(len(arms) - 1)  # every module: the costliest arm
    memory = [next(d.stream) for _ in range(4)]
    d.stream.close()

    def run(next_batch) -> float:
        d.train_step(next_batch(0), layers)  # warm-up (and the workers' start)
        start = time.perf_counter()
        for i in range(steps):
            d.train_step(next_batch(i), layers)
        return (time.perf_counter() - start) / steps * 1e3

    out = {"in_memory_ms": run(lambda i: memory[i % len(memory)])}
    for w in workers:
        stream = BatchStream(task, "train", batch, 1, cpu, workers=w)
        out[f"{w}_workers_ms"] = run(lambda i: next(stream))
        stream.close()
        out[f"{w}_workers_ratio"] = out[f"{w}_workers_ms"] / out["in_memory_ms"]
    d.close()
    return out


def paper_distiller(shapes, task, device: torch.device) -> Distiller:
    """`bench/gpu_step.py`'s OPTIMA step at `shapes` (its `Shapes`): a CoCa ViT-L/14
    teacher and a Tiny12 student (4/4/4 layers, CoCa-Base width) with random
    weights, the OPTIMA loss with the layouts paired, AdamW, bf16 autocast on a GPU."""
    from optima.align import pair_layouts

    torch.manual_seed(0)
    t_model = coca_model(shapes.coca("coca_ViT-L-14"), device=device)
    s_model = coca_model(shapes.coca("coca_ViT-B-32", (4, 4, 4)), device=device)
    teacher = Network(t_model, AttentionalPoolerHead(t_model.feature_dim, len(LABELS))).to(device)
    student = Network(s_model, AttentionalPoolerHead(s_model.feature_dim, len(LABELS))).to(device)
    loss = optima_loss(s_model.distill_modules(), t_model.distill_modules(), **pair_layouts(s_model, t_model)).to(device)
    opt = torch.optim.AdamW([*student.parameters(), *loss.parameters()], lr=1e-5)
    arms = ArmSpace(s_model.module_names())
    return Distiller(teacher=teacher, student=student, task=task, loss=loss, arms=arms, policy=FixedPolicy(len(arms)),
                     reward=combined_reward(), optimizer=opt,
                     scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                     stream=BatchStream(task, "train", shapes.batch, 0, device), steps_per_round=1, rounds=1,
                     device=device, amp=device.type == "cuda")


def paper_step_times(task, shapes, workers: list[int], steps: int, device: torch.device) -> dict:
    """ms per paper-shape OPTIMA step (`bench/gpu_step.py`'s: CoCa ViT-L/14
    teacher, Tiny12 student, bf16 autocast on a GPU), the 7 arms played in turn
    as a run plays them, on batches already on `device` (before and after the
    others: their mean is `in_memory_ms`) and fed by a stream with each worker
    count. Each feeding first plays every arm once, untimed (kernel choice,
    the workers' start)."""
    d = paper_distiller(shapes, task, device)
    arms = [d.arm_layers(k) for k in range(len(d.arms))]
    memory = [next(d.stream) for _ in range(2)]  # on the device, unpacked
    d.stream.close()

    def run(next_batch) -> float:
        for i in range(len(arms)):
            d.train_step(next_batch(), arms[i])
        _sync(device)
        start = time.perf_counter()
        for i in range(steps):
            d.train_step(next_batch(), arms[i % len(arms)])
        _sync(device)
        return (time.perf_counter() - start) / steps * 1e3

    out = {"in_memory_before_ms": run(cycle(memory).__next__)}
    for w in workers:
        stream = BatchStream(task, "train", shapes.batch, 1, device, workers=w)
        out[f"{w}_workers_ms"] = run(stream.__next__)
        stream.close()
    out["in_memory_after_ms"] = run(cycle(memory).__next__)
    out["in_memory_ms"] = (out["in_memory_before_ms"] + out["in_memory_after_ms"]) / 2
    for w in workers:
        out[f"{w}_workers_ratio"] = out[f"{w}_workers_ms"] / out["in_memory_ms"]
    d.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cuda: the paper-shape step on the GPU (auto: cuda when there is one)")
    p.add_argument("--smoke", action="store_true", help="the cuda mode at tiny shapes on the CPU, seconds (CI)")
    p.add_argument("--workers", type=int, nargs="+",
                   help="worker counts besides 0 (default: 1 2; cuda: the CPUs available less one)")
    p.add_argument("--batch", type=int, help="default: 32; cuda: 128")
    p.add_argument("--images", type=int, help="generated JPEGs, an epoch (default: 256; cuda: 2 batches)")
    p.add_argument("--batches", type=int, help="batches timed per worker count (default: 12; cuda: 4)")
    p.add_argument("--repeats", type=int, default=2, help="loader measurements per worker count (median kept)")
    p.add_argument("--steps", type=int, help="steps timed per feeding (default: 8; cuda: 14, each arm twice)")
    p.add_argument("--width", type=int, default=256, help="width of the CPU step's models")
    p.add_argument("--load-threads", type=int, default=8, help="the task's decode threads without workers")
    p.add_argument("--data-dir", help="reuse (or keep) the generated images here")
    p.add_argument("--out", help="write the JSON result here: a file, or a folder for input_pipeline.json "
                                 "(input_pipeline_<card>.json on a GPU)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("input_pipeline.py: --device cuda, but torch finds no GPU here; --device cpu or --smoke "
                 "run on the CPU")
    paper = args.smoke or args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if paper and not args.smoke else "cpu")
    shapes = None
    if paper:
        from gpu_step import Shapes

        shapes = Shapes(args.smoke, args.batch or 128)
        args.batch = shapes.batch
        args.workers = args.workers or [1 if args.smoke else max(1, available_cpus() - 1)]
        args.batches = args.batches or (1 if args.smoke else 4)
        args.steps = args.steps or (1 if args.smoke else 14)
    args.batch = args.batch or 32
    args.workers = args.workers or [1, 2]
    args.batches = args.batches or 12
    args.steps = args.steps or 8
    images = args.images or (2 * args.batch if paper else 256)
    images = -(-images // args.batch) * args.batch  # whole batches only: every step has the same shapes
    image_size, context = (shapes.res, shapes.ctx) if paper else (224, 76)
    torch.set_num_threads(1)  # the training process's step: one thread, as in the tests

    started = time.time()
    load_before, groups_before = os.getloadavg(), _busy_groups()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_dir or tmp)
        if not (root / "snli_ve_train.jsonl").exists():
            make_flickr_like(root, images)
        sizes = [f.stat().st_size for f in (root / "flickr30k_images").iterdir()]
        task = SnliVe(data_dir=str(root), image_size=image_size, context_length=context, augment=True,
                      load_threads=args.load_threads)
        task.records("train")
        # the synchronous loader twice: with the task's decode threads (its default) and without
        variants = [(f"0_workers_{args.load_threads}_threads", 0, args.load_threads), ("0_workers_serial", 0, 0),
                    *((f"{w}_workers", w, args.load_threads) for w in args.workers if w > 0)]
        if paper:  # the serial baseline and the workers that feed the step
            variants = variants[1:]
        rates = {name: [] for name, _, _ in variants}
        cpu_ms = {name: [] for name, _, _ in variants}
        for _ in range(args.repeats):  # interleaved, so that a burst of load elsewhere hits every variant alike
            for name, w, threads in variants:
                task.load_threads = threads
                rate, ms = loader_rate(task, args.batch, w, args.batches, warmup=1 + w, device=device)
                rates[name].append(rate)
                cpu_ms[name].append(ms)
        task.load_threads = args.load_threads
        loader = {}
        baselines = {name: statistics.median(rates[name]) for name, w, _ in variants if w == 0}
        for name, w, threads in variants:
            rate = statistics.median(rates[name])
            loader[name] = {"workers": w, "decode_threads": threads if w == 0 else 1,
                            "images_per_s": round(rate, 1), "cpu_ms_per_image": round(statistics.median(cpu_ms[name]), 2),
                            # cores its processes got: rate x CPU time per image (2.0 = both cores of an idle machine)
                            "cores_used": round(rate * statistics.median(cpu_ms[name]) / 1e3, 2),
                            **{f"speedup_over_{b}": round(rate / r, 3) for b, r in baselines.items()},
                            "all_images_per_s": [round(r, 1) for r in rates[name]]}
            print(f"loader, {name}: {rate:.1f} images/s, {statistics.median(cpu_ms[name]):.1f} CPU ms/image, "
                  f"{loader[name]['cores_used']} cores "
                  + " ".join(f"({rate / r:.2f}x {b})" for b, r in baselines.items()), flush=True)
        if paper:
            step = paper_step_times(task, shapes, args.workers, args.steps, device)
        else:
            step = step_times(task, args.batch, args.width, [0, *args.workers], args.steps)
        for k, v in step.items():
            print(f"step {k}: {v:.3f}", flush=True)

    if paper:
        step_shapes = {"teacher": "coca_ViT-L-14", "student": "tiny12 (4/4/4 layers, coca_ViT-B-32 width, patch "
                       f"{shapes.patch})", "arms": "the 7 in turn", "smoke": args.smoke,
                       "precision": "bf16 autocast" if device.type == "cuda" else "float32"}
    else:
        step_shapes = {"model_width": args.width, "teacher_layers": [4, 4, 4], "student_layers": [2, 2, 2],
                       "arm": "every module"}
    result = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {"cpu": cpu_name(), "cpus_available": available_cpus(), "platform": platform.platform(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {})},
        "conditions": {"load_average_before": [round(x, 2) for x in load_before],
                       "load_average_after": [round(x, 2) for x in os.getloadavg()],
                       "other_busy_scheduler_groups_before_after": [groups_before, _busy_groups()],
                       "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                       "seconds": round(time.time() - started, 1)},
        "data": {"images": len(sizes), "image_px": [500, 375], "mean_kB": round(sum(sizes) / len(sizes) / 1e3, 1),
                 "image_size": image_size, "context_length": context, "augment": True, "batch": args.batch,
                 "load_threads_without_workers": args.load_threads},
        "loader": loader,
        "step": {"device": device.type, **step_shapes, **{k: round(v, 3) for k, v in step.items()}},
    }
    if paper:  # issue 10: the step fed by the loader at most 5% slower than on batches already on the GPU
        result["goal_ratio_at_most_1.05"] = {f"{w}_workers": step[f"{w}_workers_ratio"] <= 1.05
                                             for w in args.workers}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:  # a file, or a folder to hold input_pipeline.json
        out = Path(args.out)
        if out.is_dir() or not out.suffix:
            card = "smoke" if args.smoke else \
                "".join(c if c.isalnum() else "_" for c in result["machine"].get("gpu", "")).strip("_")
            out = out / (f"input_pipeline_{card}.json" if card else "input_pipeline.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def _busy_groups() -> int:
    """Scheduler groups (Linux autogroups: sessions) other than this one with a
    running process: with autogroup scheduling each gets an equal share of the
    cores, so on a shared machine this decides how much CPU the loader gets."""
    groups, mine = set(), _autogroup("self")
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):  # gone meanwhile
            continue
        if state == "R":
            groups.add(_autogroup(pid))
    return len(groups - {mine, None})


def _autogroup(pid: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/autogroup").read_text().split()[0]
    except (OSError, IndexError):  # gone meanwhile
        return None


if __name__ == "__main__":
    main()
