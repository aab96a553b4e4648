"""A whole paper run on one GPU, as one prepared script: `gin/snlive_tiny12.gin`
(CoCa ViT-L/14 teacher, CoCa-Tiny12 student, the paper's architectures with
random weights: no checkpoint can be downloaded) on SNLI-VE synthesized in its
official layout (`optima data synth`), every stage through the real CLI.

Stages, each timed, into `gpu_whole_run_<card>.json` under `--out` (rewritten
after every stage, `"complete": false` until the end, so a call cut short keeps
what it measured):

1. `synth`: `optima data synth snlive --size N --image-size 224`;
2. `full`: `optima run gin/snlive_tiny12.gin` uninterrupted: a few hundred
   teacher steps, a few rounds of OPTIMA, test evaluation. Per stage (from the
   run's TensorBoard step times): seconds, steps, samples/s; startup and
   evaluation seconds; peak memory (`peak_gpu_memory_GiB` that the run writes
   to metrics.json per stage, and nvidia-smi's memory.used); GPU utilisation
   (nvidia-smi polled every 250 ms: mean and max per stage);
3. `interrupted`: the same run in another run directory and cache (the full
   run's cached teacher copied in, so both distil from one teacher), sent
   SIGTERM once `--interrupt-after` rounds are logged (mid-distillation: the
   checkpoint holds the round in progress), which must exit 143;
4. `resumed`: `optima run ... --resume` of it;
   `resumed_equals_uninterrupted`: the students' weights bit for bit (and their
   largest difference), the test metrics, the arms played and the rewards.
   If they differ (CUDA kernels that are not deterministic), `--deterministic
   auto` (the default) runs the full and the interrupted/resumed distillation
   again with `torch.use_deterministic_algorithms(True)`,
   `CUBLAS_WORKSPACE_CONFIG=:4096:8` and cuDNN's benchmark off (no binding does
   this today), and records whether that makes them equal and its cost in
   distillation samples/s;
5. `export`: `optima export` of the full run (open_clip files, model card);
6. `eval`: `optima eval` of the export on the test split (on the GPU), against
   the run's own test metric;
7. `step`: `bench/gpu_step.py --only reference,tiny12 --rows optima,layerwise`
   at the run's batch size in this call, so the run's distillation samples/s
   sits beside the bare OPTIMA step and the plain reference step
   (`../shared/bench/naive_distill_step.py`) measured on the same card
   (`--step-args` passes more, e.g. `--compile --profile`).

On a GPU machine (H100/H200) in one call, with the wheels this project needs
that such a machine lacks carried beside the checkout (it cannot download):

    pip download open_clip_torch gin-config ftfy -d wheels/ --no-deps   # here, once
    # on the device machine, from the repository root (torch is there; nothing can be fetched,
    # hence --no-build-isolation):
    pip install --no-deps wheels/*.whl && pip install --no-deps --no-build-isolation -e . && \\
        python bench/gpu_whole_run.py --out $OUT

then copy `$OUT/gpu_whole_run_<card>.json` (and `$OUT/step/`) to
`bench/results/`. Not yet run on a GPU: the defaults (4,096 examples, 300
teacher steps at batch 64, 10 rounds of 20 steps: two distillations of 200
steps, four if the deterministic pair runs) were chosen to stay well inside a 10-minute call; every size is a
flag. `--cpu-smoke` runs every stage at tiny shapes on the CPU
(tests/test_benches.py): tiny CoCas, 32 px, a few steps, a few CPU-seconds
per stage.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "gin/snlive_tiny12.gin"
STUDENT = "tiny12"
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
#: the CLI, with torch's deterministic algorithms switched on first (see the module doc)
DETERMINISTIC_LAUNCH = ("import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
                        "torch.backends.cudnn.benchmark = False; from optima.cli.main import main; "
                        "sys.argv[0] = 'optima'; main()")


def tiny_coca_macro() -> str:
    """`TINY_COCA = {...}` from gin/common/tiny_coca.gin, as one binding."""
    text = (ROOT / "gin" / "common" / "tiny_coca.gin").read_text()
    return " ".join(line.split("#")[0].strip() for line in text.splitlines() if not line.startswith("#"))


def run_bindings(args, data: Path, cache: Path, device: str) -> list[str]:
    """The paper config at the script's sizes: random weights, the synthesized data."""
    steps = args.rounds * args.steps_per_round
    out = [
        "teacher/coca_model.pretrained = None", f"{STUDENT}/coca_model.init_from = None",
        f"snli_ve_task.data_dir = '{data}'", f"experiment.cache_dir = '{cache}'", f"experiment.device = '{device}'",
        f"experiment.eval_batch_size = {args.batch}",
        f"teacher_training.steps = {args.teacher_steps}", f"teacher_training.batch_size = {args.batch}",
        f"teacher_training.warmup_steps = {args.teacher_steps // 10}",
        f"distillation.rounds = {args.rounds}", f"distillation.steps_per_round = {args.steps_per_round}",
        f"distillation.batch_size = {args.batch}", f"distillation.warmup_steps = {steps // 10}",
        "distillation.checkpoint_every = 1",
        "optima_policy.warmup_rounds = 7",  # once per arm: a few rounds leave the policy some rounds of its own
    ]
    if args.cpu_smoke:
        out += [tiny_coca_macro(), "teacher/coca_model.arch = %TINY_COCA", "teacher/coca_model.layers = (2, 2, 2)",
                f"{STUDENT}/coca_model.arch = %TINY_COCA", f"{STUDENT}/coca_model.layers = (1, 1, 1)",
                f"snli_ve_task.image_size = {args.image_size}", "snli_ve_task.context_length = 16",
                "teacher_training.amp = False", "distillation.amp = False", "experiment.data_workers = 1"]
    return out


class GpuMonitor:
    """nvidia-smi polled every 250 ms in the background (nothing where it is absent):
    utilisation and memory in use, summarised per time span."""

    def __init__(self):
        self.samples: list[tuple[float, float, float]] = []  # (time, utilisation %, MiB in use)
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                 "-lms", "250"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.time(), util, mem))

    def span(self, start: float, end: float) -> dict | None:
        got = [(u, m) for t, u, m in self.samples if start <= t <= end]
        if self.proc is None or not got:
            return None
        return {"gpu_util_mean_pct": round(sum(u for u, _ in got) / len(got), 1),
                "gpu_util_max_pct": max(u for u, _ in got), "memory_used_max_MiB": max(m for _, m in got),
                "samples": len(got)}

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()


def step_times(run_dir: Path, stage: str) -> list[tuple[int, float]]:
    """(step, wall time) of every step a stage logged (its `lr` scalar in TensorBoard)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = run_dir / "tensorboard" / stage
    if not folder.is_dir():
        return []
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    if "lr" not in events.Tags().get("scalars", []):
        return []
    return sorted((e.step, e.wall_time) for e in events.Scalars("lr"))


def stage_rate(times: list[tuple[int, float]], batch: int) -> dict:
    """Seconds from the first logged step to the last, and samples/s over them
    (the first step, which pays warm-up, is the start of the span, not in it)."""
    if len(times) < 2:
        return {"steps": len(times)}
    (s0, t0), (s1, t1) = times[0], times[-1]
    return {"steps": len(times), "seconds": round(t1 - t0, 3), "samples_per_s": round((s1 - s0) * batch / (t1 - t0), 2),
            "first_step_wall": t0, "last_step_wall": t1}


class Recorder:
    """The JSON record, rewritten whole after every stage."""

    def __init__(self, path: Path, record: dict):
        self.path, self.record = path, record

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name("." + self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=1) + "\n")
        tmp.replace(self.path)


def peak_rss_MiB() -> float:
    """The largest resident memory of any child process so far (what a CPU run used)."""
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)


class Runner:
    """Runs the CLI's commands, each timed, its output kept in `logs/`."""

    def __init__(self, out: Path, monitor: GpuMonitor):
        self.out, self.monitor = out, monitor
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def command(self, args: list[str], deterministic: bool = False) -> list[str]:
        if deterministic:
            return [sys.executable, "-c", DETERMINISTIC_LAUNCH, *args]
        return [sys.executable, "-m", "optima.cli.main", *args]

    def run(self, name: str, args: list[str], deterministic: bool = False, stop_when=None,
            expect: int = 0) -> dict:
        """Run `optima ARGS`; `stop_when()` polled every 0.1 s: once true, SIGTERM.
        Returns the seconds, exit code, the GPU's span and the log's path; a
        different exit code than `expect` raises with the log's tail."""
        cmd = self.command(args, deterministic)
        env = {**os.environ, **(DETERMINISTIC_ENV if deterministic else {}), "COLUMNS": "160"}
        log = self.out / "logs" / f"{name}.log"
        print(f"== {name}: optima {shlex.join(args)[:300]}", flush=True)
        start = time.time()
        signalled = None
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
            while proc.poll() is None:
                if stop_when is not None and signalled is None and stop_when():
                    proc.send_signal(signal.SIGTERM)
                    signalled = round(time.time() - start, 3)
                time.sleep(0.1)
        end = time.time()
        result = {"seconds": round(end - start, 3), "exit_code": proc.returncode, "log": str(log.relative_to(self.out)),
                  "command": "optima " + shlex.join(args), "peak_child_rss_MiB": peak_rss_MiB(),
                  "start_wall": start, "end_wall": end}
        if signalled is not None:
            result["sigterm_after_s"] = signalled
        gpu = self.monitor.span(start, end)
        if gpu:
            result["nvidia_smi"] = gpu
        if stop_when is not None and signalled is None:
            raise RuntimeError(f"{name}: the run ended (exit code {proc.returncode}) before the SIGTERM; "
                               "give it more rounds or steps per round")
        if proc.returncode != expect:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name}: exit code {proc.returncode}, expected {expect}; {log}:\n{tail}")
        return result


def run_stages(run_dir: Path, run: dict, batch: int, monitor: GpuMonitor) -> dict:
    """A finished run's stages from its TensorBoard step times and metrics.json
    (a resumed run: the steps logged by this attempt only)."""
    summary = json.loads((run_dir / "metrics.json").read_text())
    out = {}
    for stage in ("teacher", STUDENT):
        times = [(step, wall) for step, wall in step_times(run_dir, stage) if wall >= run["start_wall"]]
        rate = stage_rate(times, batch)
        info = summary["stages"].get(stage, {})
        rate["cached"] = bool(info.get("cached"))
        if "peak_gpu_memory_GiB" in info:
            rate["peak_gpu_memory_GiB"] = info["peak_gpu_memory_GiB"]
        if "first_step_wall" in rate:
            gpu = monitor.span(rate["first_step_wall"], rate["last_step_wall"])
            if gpu:
                rate["nvidia_smi"] = gpu
        out[stage] = rate
    walls = [r for r in out.values() if "first_step_wall" in r]
    if walls:
        out["startup_s"] = round(min(r["first_step_wall"] for r in walls) - run["start_wall"], 3)
        out["evaluation_and_saving_s"] = round(run["end_wall"] - max(r["last_step_wall"] for r in walls), 3)
    out["test_metrics"] = summary["metrics"]
    return out


def same_run(a: Path, b: Path) -> dict:
    """Whether two finished runs' students and results are the same."""
    import torch
    from safetensors.torch import load_file

    wa, wb = (load_file(str(d / f"{STUDENT}.safetensors")) for d in (a, b))
    diffs = [float((wa[k].double() - wb[k].double()).abs().max()) if wa[k].numel() else 0.0
             for k in wa if k in wb and wa[k].shape == wb[k].shape]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    sa, sb = ma["stages"][STUDENT], mb["stages"][STUDENT]
    out = {"weights_identical": wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa),
           "weights_max_abs_diff": max(diffs, default=0.0),
           "test_metrics_equal": ma["metrics"] == mb["metrics"],
           "plays_equal": sa["plays"] == sb["plays"], "rewards_equal": sa["rewards"] == sb["rewards"],
           "metrics": {"uninterrupted": ma["metrics"][STUDENT], "resumed": mb["metrics"][STUDENT]}}
    out["equal"] = all(out[k] for k in ("weights_identical", "test_metrics_equal", "plays_equal", "rewards_equal"))
    return out


def rounds_logged(run_dir: Path) -> int:
    log = run_dir / "rounds" / f"{STUDENT}.jsonl"
    try:
        return sum(1 for line in log.read_text().splitlines() if line.strip())
    except FileNotFoundError:
        return 0


def resume_pair(runner: Runner, args, data: Path, out: Path, tag: str, teacher_cache: Path, device: str,
                deterministic: bool) -> dict:
    """An uninterrupted run (unless `tag` is '': the plain full run is the
    reference) and a SIGTERMed then resumed one, both distilling from the cached
    teacher in `teacher_cache`; their comparison."""
    result = {}
    runs = out / "runs"

    def fresh_cache(name: str) -> Path:
        cache = out / "cache" / name
        cache.mkdir(parents=True, exist_ok=True)
        for f in teacher_cache.glob("teacher-*.safetensors"):
            shutil.copy2(f, cache / f.name)  # one teacher for both runs: the comparison is of the distillation
        return cache

    if tag:
        name = f"full_{tag}"
        full = runner.run(name, ["run", CONFIG, "--run-dir", str(runs / name),
                                 *bind(run_bindings(args, data, fresh_cache(name), device))], deterministic)
        full["stages"] = run_stages(runs / name, full, args.batch, runner.monitor)
        result["full"] = full
    reference = runs / (f"full_{tag}" if tag else "full")
    name = f"resumed_{tag}" if tag else "resumed"
    bindings = bind(run_bindings(args, data, fresh_cache(name), device))
    run_dir = runs / name
    result["interrupted"] = runner.run(f"{name}_interrupted", ["run", CONFIG, "--run-dir", str(run_dir), *bindings],
                                       deterministic, stop_when=lambda: rounds_logged(run_dir) >= args.interrupt_after,
                                       expect=143)
    result["interrupted"]["rounds_logged_at_sigterm"] = args.interrupt_after
    resumed = runner.run(name, ["run", CONFIG, "--resume", str(run_dir), *bindings], deterministic)
    resumed["stages"] = run_stages(run_dir, resumed, args.batch, runner.monitor)
    result["resumed"] = resumed
    result["resumed_equals_uninterrupted"] = same_run(reference, run_dir)
    return result


def bind(bindings: list[str]) -> list[str]:
    return [a for b in bindings for a in ("-b", b)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the JSON, the data, the runs and their logs")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, seconds per stage (CI)")
    p.add_argument("--size", type=int, help="training examples synthesized (default 4096; smoke 16)")
    p.add_argument("--image-size", type=int, help="image side (default 224; smoke 32)")
    p.add_argument("--batch", type=int, help="teacher and distillation batch (default 64; smoke 4)")
    p.add_argument("--teacher-steps", type=int, help="teacher fine-tuning steps (default 300; smoke 4)")
    p.add_argument("--rounds", type=int, help="distillation rounds (default 10; smoke 8)")
    p.add_argument("--steps-per-round", type=int, help="steps per round (default 20; smoke 4)")
    p.add_argument("--interrupt-after", type=int, help="SIGTERM once this many rounds are logged (default: half)")
    p.add_argument("--deterministic", choices=("auto", "on", "off"), default="auto",
                   help="auto: a deterministic pair of runs too when the plain resumed run differs")
    p.add_argument("--no-step", action="store_true", help="skip bench/gpu_step.py")
    p.add_argument("--step-args", default="", help="more arguments for bench/gpu_step.py, e.g. '--compile'")
    args = p.parse_args()
    smoke = args.cpu_smoke
    defaults = {"size": (4096, 16), "image_size": (224, 32), "batch": (64, 4), "teacher_steps": (300, 4),
                "rounds": (10, 8), "steps_per_round": (20, 4)}
    for key, (gpu, cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, cpu if smoke else gpu)
    if args.interrupt_after is None:
        args.interrupt_after = max(1, args.rounds // 2)
    if not 1 <= args.interrupt_after < args.rounds:
        sys.exit(f"gpu_whole_run.py: --interrupt-after must be in 1..rounds - 1 = {args.rounds - 1}")

    import torch

    if smoke:
        device, card = "cpu", "cpu_smoke"
    elif torch.cuda.is_available():
        device = "cuda"
        card = "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name()).strip("_")
    else:
        sys.exit("gpu_whole_run.py: no GPU here; --cpu-smoke runs every stage at tiny shapes on the CPU")
    out = Path(args.out).resolve()
    if out.exists() and any(p for p in out.iterdir() if not p.name.startswith("gpu_whole_run")):
        sys.exit(f"gpu_whole_run.py: --out {out} holds files already; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    record = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
        "command": shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "smoke": smoke, "complete": False,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "config": CONFIG,
        "load": os.getloadavg(), "cpus": os.cpu_count(),
        "sizes": {k: getattr(args, k) for k in (*defaults, "interrupt_after")},
        "note": "random weights in the paper's architectures (no checkpoints); SNLI-VE synthesized by optima data synth",
        "stages": {},
    }
    recorder = Recorder(out / f"gpu_whole_run_{card}.json", record)
    monitor = GpuMonitor()
    runner = Runner(out, monitor)
    stages = record["stages"]
    started = time.time()
    try:
        stages["synth"] = runner.run("synth", ["data", "synth", "snlive", "--out", str(data), "--size", str(args.size),
                                               "--image-size", str(args.image_size)])
        recorder.save()

        full = runner.run("full", ["run", CONFIG, "--run-dir", str(out / "runs" / "full"),
                                   *bind(run_bindings(args, data, out / "cache" / "full", device))])
        full["stages"] = run_stages(out / "runs" / "full", full, args.batch, monitor)
        stages["full"] = full
        recorder.save()

        pair = resume_pair(runner, args, data, out, "", out / "cache" / "full", device, deterministic=False)
        record["resumed_equals_uninterrupted"] = same = pair.pop("resumed_equals_uninterrupted")
        stages.update(pair)  # interrupted, resumed
        recorder.save()
        if args.deterministic == "on" or (args.deterministic == "auto" and not same["equal"]):
            det = resume_pair(runner, args, data, out, "deterministic", out / "cache" / "full", device,
                              deterministic=True)
            plain_rate = full["stages"][STUDENT].get("samples_per_s")
            det_rate = det["full"]["stages"][STUDENT].get("samples_per_s")
            record["deterministic"] = {
                "settings": {"torch.use_deterministic_algorithms": "True (warn_only)",
                             "torch.backends.cudnn.benchmark": False, **DETERMINISTIC_ENV},
                "resumed_equals_uninterrupted": det["resumed_equals_uninterrupted"],
                "distillation_samples_per_s": det_rate,
                "distillation_samples_per_s_over_plain": det_rate / plain_rate if det_rate and plain_rate else None,
                "runs": det}
            recorder.save()

        export_dir = out / "export"
        stages["export"] = runner.run("export", ["export", str(out / "runs" / "full"), "--out", str(export_dir),
                                                 "--name", "snlive-tiny12-random"])
        recorder.save()

        eval_dir = out / "eval"
        ev = runner.run("eval", ["eval", CONFIG, "--checkpoint", str(export_dir), "--out", str(eval_dir),
                                 "--device", device, *bind(run_bindings(args, data, out / "cache" / "full", device))])
        evaluated = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
        in_run = full["stages"]["test_metrics"][STUDENT]
        ev["metrics"] = evaluated
        ev["run_metrics"] = in_run
        ev["equals_run"] = evaluated == in_run
        stages["eval"] = ev
        recorder.save()

        if not args.no_step:
            step_out = out / "step"
            cmd = [sys.executable, "bench/gpu_step.py", "--only", "tiny12" if smoke else "reference,tiny12",
                   "--rows", "optima,layerwise", "--batch", str(args.batch), "--out", str(step_out),
                   *(["--cpu-smoke"] if smoke else []), *shlex.split(args.step_args)]
            print(f"== step: {shlex.join(cmd)}", flush=True)
            start = time.time()
            with open(out / "logs" / "step.log", "w") as f:
                done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
            step = {"seconds": round(time.time() - start, 3), "exit_code": done.returncode,
                    "command": shlex.join(cmd[1:]), "log": "logs/step.log"}
            found = sorted(step_out.glob("gpu_step*.json"))
            if found:
                bench = json.loads(found[0].read_text())
                step["json"] = str(found[0].relative_to(out))
                rows = bench.get(STUDENT, {})
                ref = bench.get("reference", {}).get(f"{STUDENT}.step_hidden_attn", {})
                run_rate = full["stages"][STUDENT].get("samples_per_s")
                step["samples_per_s"] = {
                    "optima_step": rows.get("optima", {}).get("samples_per_s"),
                    "layerwise_step": rows.get("layerwise", {}).get("samples_per_s"),
                    "reference_step": ref.get("samples_per_s"),
                    "whole_run_distillation": run_rate}
                if run_rate and step["samples_per_s"]["optima_step"]:
                    step["whole_run_over_optima_step"] = run_rate / step["samples_per_s"]["optima_step"]
                if run_rate and ref.get("samples_per_s"):
                    step["whole_run_over_reference_step"] = run_rate / ref["samples_per_s"]
            stages["step"] = step
            recorder.save()
        record["complete"] = True
    except Exception as e:
        record["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        record["seconds"] = round(time.time() - started, 1)
        monitor.close()
        recorder.save()
        print(f"wrote {recorder.path}", flush=True)


if __name__ == "__main__":
    main()
