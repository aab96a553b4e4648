"""The model card of an export (`MODEL_CARD.md`): teacher and student, their
parameters per module, FLOPs per example at the task's input size
(`torch.utils.flop_counter.FlopCounterMode`), CPU latency per example at batch 1
on the exporting machine, the task metrics of the run, the policy's arm
shares, the seed and the operative gin config."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable, Mapping

import torch

from optima.checkpoint import write_text_atomic
from optima.errors import ConfigError
from optima.stages import TEACHER

#: latency: at least this many timed forwards per network, more until this many seconds passed
LATENCY_MIN_RUNS, LATENCY_MIN_SECONDS, LATENCY_MAX_RUNS = 20, 2.0, 200


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else `platform.processor()`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe(network: torch.nn.Module) -> dict[str, Any]:
    """Parameter counts: the whole network, the head, each module's layers, and the rest
    of the model (embeddings, poolers, norms, projections)."""
    model, head = network.model, network.head
    model_ids = {id(p) for p in model.parameters()}
    modules = {m.name: {"layers": len(m), "width": m.width, "params": m.num_parameters()}
               for m in model.distill_modules()}
    model_params = sum(p.numel() for p in model.parameters())
    return {"params": model_params + sum(p.numel() for p in head.parameters() if id(p) not in model_ids),
            "model_params": model_params,
            "head_params": sum(p.numel() for p in head.parameters() if id(p) not in model_ids),
            "modules": modules,
            "other_params": model_params - sum(m["params"] for m in modules.values())}


def example_batch(task) -> dict[str, Any]:
    """The first example of the task's test split, as a batch of one."""
    return next(iter(task.batches("test", 1, shuffle=False, seed=0)))


def input_size(batch: Mapping[str, Any]) -> str:
    """Per-example shapes of the batch's tensors that are more than one number (e.g. `image 3x32x32, text 16`)."""
    return ", ".join(f"{k} {'x'.join(map(str, v.shape[1:]))}" for k, v in batch.items()
                     if isinstance(v, torch.Tensor) and v.dim() >= 2)


@torch.no_grad()
def flops(network: torch.nn.Module, batch: Mapping[str, Any]) -> int:
    """FLOPs of one forward of `batch` (FlopCounterMode: matmuls, convolutions, attention; 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    network.eval()
    with FlopCounterMode(display=False) as counter:
        network(batch)
    return int(counter.get_total_flops())


@torch.no_grad()
def latencies(networks: Mapping[str, torch.nn.Module], batch: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Seconds per forward at batch 1 on the CPU, `{"median", "min", "runs"}` per
    network, the networks timed in turn (so that load from other processes
    touches each alike). The minimum is the least disturbed by other processes."""
    for net in networks.values():
        net.eval()
        for _ in range(2):  # warm-up: allocations, kernel selection
            net(batch)
    times: dict[str, list[float]] = {name: [] for name in networks}
    start = time.perf_counter()
    runs = 0
    while runs < LATENCY_MAX_RUNS and (runs < LATENCY_MIN_RUNS or time.perf_counter() - start < LATENCY_MIN_SECONDS):
        for name, net in networks.items():
            t0 = time.perf_counter()
            net(batch)
            times[name].append(time.perf_counter() - t0)
        runs += 1
    return {name: {"median": statistics.median(t), "min": min(t), "runs": len(t)} for name, t in times.items()}


def _m(n: float) -> str:
    return f"{n / 1e6:.3f} M" if n < 1e8 else f"{n / 1e6:.1f} M"


def _flops(n: float) -> str:
    for unit, scale in (("GFLOPs", 1e9), ("MFLOPs", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} FLOPs"


def measure(networks: Mapping[str, torch.nn.Module], task) -> dict[str, Any]:
    """Parameters, FLOPs and CPU latency of each network on one test example."""
    out: dict[str, Any] = {"networks": {name: describe(net) for name, net in networks.items()},
                           "cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__}
    try:
        batch = example_batch(task)
    except (ConfigError, StopIteration, OSError) as e:
        out["no_example"] = str(e).splitlines()[0] if str(e) else "the test split is empty"
        return out
    out["input"] = input_size(batch)
    for name, net in networks.items():
        out["networks"][name]["flops"] = flops(net, batch)
    for name, timing in latencies(networks, batch).items():
        out["networks"][name]["latency_s"] = timing
    if hasattr(os, "getloadavg"):  # how busy the machine was: other processes' load slows the timings
        out["load_average"] = os.getloadavg()[0]
    return out


def render(*, name: str, stage: str, run, spec, task, measured: Mapping[str, Any], export: Mapping[str, Any],
           teacher_note: str | None, operative: str, operative_file: str) -> str:
    nets = measured["networks"]
    columns = [n for n in (TEACHER, stage) if n in nets]
    metrics = run.summary.get("metrics", {})
    chain = " -> ".join(run.stages[:run.stages.index(stage) + 1])
    lines = [f"# {name}", "",
             f"Stage `{stage}` of the OPTIMA run `{run.directory}` (distillation {chain}), distilled on "
             f"`{type(task).__name__}`, exported with `optima export`.", ""]
    model = export["model"]
    lines += ["## Loading", "",
              f"The model ({model.get('format', 'its library')}'s own format; no OPTIMA code needed):", "",
              "```python", model["load"].replace("; ", "\n"), "```", "",
              f"The task head (`{export['head']['file']}`, factory `{export['head']['factory']}`, "
              f"{export['head']['num_outputs']} outputs) over the model's features, with OPTIMA installed:", "",
              "```python", "from optima.export import load_head", *model.get("wrap", "").split("; "),
              f"head = load_head({os.path.join(export['directory'], export['head']['file'])!r}, model)",
              "logits = head(model(batch))  # batch: a dict of tensors, as the task makes them", "```", ""]
    # sizes
    header = "| | " + " | ".join(columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    rows = [header, rule]

    def row(label, fn):
        rows.append(f"| {label} | " + " | ".join(fn(nets[c]) for c in columns) + " |")

    row("parameters (model + head)", lambda n: _m(n["params"]))
    module_names = list(next(iter(nets.values()))["modules"])
    for mod in module_names:
        row(f"`{mod}` layers (count x width: params)",
            lambda n, mod=mod: f"{n['modules'][mod]['layers']} x {n['modules'][mod]['width']}: "
                               f"{_m(n['modules'][mod]['params'])}")
    row("other model parameters (embeddings, poolers, norms, projections)", lambda n: _m(n["other_params"]))
    row("head parameters", lambda n: _m(n["head_params"]))
    if "input" in measured:
        row("FLOPs per example (one forward)", lambda n: _flops(n["flops"]))
        row("CPU latency per example (batch 1): median (min)",
            lambda n: f"{n['latency_s']['median'] * 1e3:.2f} ms ({n['latency_s']['min'] * 1e3:.2f} ms)")
    for metric in sorted({k for c in columns for k in metrics.get(c, {})}):
        rows.append(f"| test {metric} (the run's `metrics.json`) | " + " | ".join(
            f"{metrics[c][metric]:.4f}" if metric in metrics.get(c, {}) else "-" for c in columns) + " |")
    lines += ["## Size, speed and quality", ""] + rows + [""]
    if "input" in measured:
        lat = {c: nets[c]["latency_s"] for c in columns}
        ratio = ""
        if TEACHER in lat and stage in lat:
            ratio = (f" Teacher / student: {lat[TEACHER]['median'] / lat[stage]['median']:.2f}x (medians), "
                     f"{lat[TEACHER]['min'] / lat[stage]['min']:.2f}x (minima); FLOPs "
                     f"{nets[TEACHER]['flops'] / nets[stage]['flops']:.2f}x.")
        load = f", 1-minute load average {measured['load_average']:.1f}" if "load_average" in measured else ""
        lines += [f"Measured on the exporting machine: {measured['cpu']} ({measured['cores']} cores{load}), "
                  f"{measured['threads']} torch thread(s), "
                  f"torch {measured['torch']}, at the task's input size ({measured['input']}; one test example). "
                  "FLOPs from `torch.utils.flop_counter.FlopCounterMode` (2 per multiply-add; one forward pass, "
                  "teacher-forced for captioning, whose greedy decoding repeats it per token). Latency: "
                  f"{lat[columns[0]]['runs']} forwards per network after 2 warm-up ones, the networks timed in "
                  "turn; other processes on the machine slow the median most, the minimum least." + ratio]
    else:
        lines += [f"FLOPs and latency not measured: no test example ({measured['no_example']})."]
    if teacher_note:
        lines += ["", teacher_note]
    # distillation
    lines += ["", "## Distillation", "", f"- seed: `experiment.seed = {spec.seed}`",
              f"- stages: {chain}; params (M) per network: "
              + ", ".join(f"{k} {v:.3f}" for k, v in run.summary.get("params_M", {}).items())]
    info = run.summary["stages"].get(stage, {})
    if "plays" in info and "arms" in info:
        plays = info["plays"]
        lines += [f"- the policy's arm shares in stage `{stage}` ({len(plays)} rounds"
                  + (", a cached stage: the plays of the run that computed it" if info.get("cached") else "") + "):",
                  "", "| arm | rounds played | share |", "|---|---:|---:|"]
        for k, label in enumerate(info["arms"]):
            count = plays.count(k)
            lines.append(f"| {label} | {count} | {count / max(1, len(plays)):.1%} |")
    lines += ["", f"## Configuration (`{operative_file}`)", "", "```gin", operative.rstrip(), "```", ""]
    return "\n".join(lines)


def write_card(path: str, *, run, spec, stage: str, task, student: torch.nn.Module, export: Mapping[str, Any],
               load_weights: Callable[[torch.nn.Module, str], None]) -> dict:
    """Measure teacher and student and write the card to `path`; returns the measurements.
    `load_weights(network, checkpoint)` loads the run's teacher (`optima.export` passes
    its loader: the card is a floor below the export)."""
    networks = {}
    teacher_note = None
    try:
        teacher = spec.network(TEACHER, task, torch.device("cpu"), run.pretrained)
        weights = run.weights(TEACHER)
        if weights is not None:
            load_weights(teacher, weights)
        networks[TEACHER] = teacher
    except ConfigError as e:
        teacher_note = f"The teacher could not be built here, so its sizes are not measured: {e}"
    if stage != TEACHER:
        networks[stage] = student
    measured = measure(networks, task)
    operative_file = "operative_config.gin"
    op_path = run.directory / operative_file
    if not op_path.is_file():
        operative_file = "config.gin"
        op_path = run.directory / operative_file
    text = render(name=export["name"], stage=stage, run=run, spec=spec, task=task, measured=measured, export=export,
                  teacher_note=teacher_note, operative=op_path.read_text(encoding="utf-8"),
                  operative_file=operative_file)
    write_text_atomic(path, text)
    return measured
