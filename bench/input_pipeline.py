"""The input pipeline, measured in one run: images/s of the loader (SNLI-VE task,
224 px, open_clip's train transforms, BPE tokens) for 0, 1, 2 ... DataLoader
workers on generated Flickr-sized JPEGs (500x375, about 83 kB), and the time of
an OPTIMA distillation step fed by the loader against the same step on batches
already in memory.

    python bench/input_pipeline.py                            # ~3 minutes on 2 cores
    python bench/input_pipeline.py --workers 1 2 4 --out bench/results/input_pipeline.json

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
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from optima.arms import ArmSpace
from optima.data import BatchStream, available_cpus
from optima.engine import Distiller, Network
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


def loader_rate(task, batch: int, workers: int, batches: int, warmup: int) -> tuple[float, float]:
    """Images/s of a stream with `workers` workers after `warmup` batches, and the
    CPU time per image of the processes making them (this one, all its threads,
    and its workers) over the same batches: on a busy machine the rate also
    depends on how much of the cores the scheduler gives this session, the CPU
    time does not."""
    stream = BatchStream(task, "train", batch, 0, torch.device("cpu"), workers=workers)
    for _ in range(warmup):
        next(stream)
    pids = [str(os.getpid()), *_children()]
    cpu, start = _cpu_seconds(pids), time.perf_counter()
    for _ in range(batches):
        next(stream)
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds(pids) - cpu
    stream.close()
    return batches * batch / elapsed, cpu / (batches * batch) * 1e3


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts besides 0")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=256, help="generated JPEGs (an epoch)")
    p.add_argument("--batches", type=int, default=12, help="batches timed per worker count")
    p.add_argument("--repeats", type=int, default=2, help="loader measurements per worker count (median kept)")
    p.add_argument("--steps", type=int, default=8, help="steps timed per feeding")
    p.add_argument("--width", type=int, default=256, help="width of the step's models")
    p.add_argument("--load-threads", type=int, default=8, help="the task's decode threads without workers")
    p.add_argument("--data-dir", help="reuse (or keep) the generated images here")
    p.add_argument("--out", help="write the JSON result here")
    args = p.parse_args()
    torch.set_num_threads(1)  # the training process's step: one thread, as in the tests

    started = time.time()
    load_before, groups_before = os.getloadavg(), _busy_groups()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_dir or tmp)
        if not (root / "snli_ve_train.jsonl").exists():
            make_flickr_like(root, args.images)
        sizes = [f.stat().st_size for f in (root / "flickr30k_images").iterdir()]
        task = SnliVe(data_dir=str(root), image_size=224, context_length=76, augment=True,
                      load_threads=args.load_threads)
        task.records("train")
        # the synchronous loader twice: with the task's decode threads (its default) and without
        variants = [(f"0_workers_{args.load_threads}_threads", 0, args.load_threads), ("0_workers_serial", 0, 0),
                    *((f"{w}_workers", w, args.load_threads) for w in args.workers if w > 0)]
        rates = {name: [] for name, _, _ in variants}
        cpu_ms = {name: [] for name, _, _ in variants}
        for _ in range(args.repeats):  # interleaved, so that a burst of load elsewhere hits every variant alike
            for name, w, threads in variants:
                task.load_threads = threads
                rate, ms = loader_rate(task, args.batch, w, args.batches, warmup=1 + w)
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
        step = step_times(task, args.batch, args.width, [0, *args.workers], args.steps)
        for k, v in step.items():
            print(f"step {k}: {v:.3f}", flush=True)

    result = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {"cpu": _cpu_name(), "cpus_available": available_cpus(), "platform": platform.platform(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "conditions": {"load_average_before": [round(x, 2) for x in load_before],
                       "load_average_after": [round(x, 2) for x in os.getloadavg()],
                       "other_busy_scheduler_groups_before_after": [groups_before, _busy_groups()],
                       "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                       "seconds": round(time.time() - started, 1)},
        "data": {"images": len(sizes), "image_px": [500, 375], "mean_kB": round(sum(sizes) / len(sizes) / 1e3, 1),
                 "image_size": 224, "context_length": 76, "augment": True, "batch": args.batch,
                 "load_threads_without_workers": args.load_threads},
        "loader": loader,
        "step": {"model_width": args.width, "teacher_layers": [4, 4, 4], "student_layers": [2, 2, 2],
                 "arm": "every module", **{k: round(v, 3) for k, v in step.items()}},
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:  # a file, or a folder to hold input_pipeline.json
        out = Path(args.out)
        out = out / "input_pipeline.json" if out.is_dir() or not out.suffix else out
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
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
