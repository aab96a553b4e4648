"""`optima data synth`: the synthetic world in a real task's official file layout
(`optima.plugins.tasks.synthetic_world.synth`), to check a setup end to end
before downloading the data sets."""
from __future__ import annotations

import time

from rich.console import Console

console = Console()

#: task -> the paper's experiment files that read it
CONFIGS = {"snlive": "gin/snlive_tiny12.gin", "vqa": "gin/vqa_tiny12.gin", "nlvr2": "gin/nlvr2_tiny12.gin",
           "coco": "gin/coco_tiny12.gin"}


def synth_command(task: str, out: str, size: int, image_size: int, seed: int, eval_size: int | None) -> dict:
    from optima.plugins.tasks.synthetic_world.synth import synthesize

    started = time.perf_counter()
    with console.status(f"synthesizing {task}") as status:
        record = synthesize(task, out, size, image_size=image_size, seed=seed, eval_size=eval_size,
                            on_progress=lambda text: status.update(f"synthesizing {task}: {text}"))
    counts = ", ".join(f"{n} {split}" for split, n in record["examples"].items())
    console.print(f"wrote {record['dataset']} ({counts} examples, {image_size} px, seed {seed}) to {out} "
                  f"in {time.perf_counter() - started:.1f} s")
    console.print("run a paper config on it (with checkpoints in place, or random weights: see README):")
    binding = f"{record['configurable']}.data_dir = '{out}'"
    console.print(f"  optima run {CONFIGS[task]} -b \"{binding}\"", markup=False, soft_wrap=True)
    return record
