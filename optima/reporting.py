"""Where a run reports to: TensorBoard event files, and whatever the CLI shows.

TensorBoard tags (read back in `tests/test_quickstart.py`):
- `<stage>/loss/<term>` per step (`teacher`: task; `distill`: task, kd, hidden,
  attn; hidden/attn are the full-model values) and `<stage>/lr`,
- `round/arm` (index), `round/reward` per round,
- `policy/<stat>/<arm label>` per round (`mean`, `sd`, `count`) and `policy/entropy`,
- `eval/<network>/<metric>` at the end.
"""
from __future__ import annotations

from typing import Sequence

from optima.engine import RoundResult


class Reporter:
    """No-op base: override what you need."""

    def on_stage(self, stage: str, total: int, unit: str) -> None: ...
    def on_arms(self, labels: Sequence[str]) -> None: ...
    def on_step(self, stage: str, step: int, losses: dict[str, float], lr: float) -> None: ...
    def on_round(self, result: RoundResult) -> None: ...
    def on_eval(self, network: str, metrics: dict[str, float]) -> None: ...
    def on_message(self, text: str) -> None: ...
    def close(self) -> None: ...


class Reporters(Reporter):
    """Fans every event out to several reporters."""

    def __init__(self, reporters: Sequence[Reporter]):
        self.reporters = list(reporters)

    def _all(self, method: str, *args) -> None:
        for r in self.reporters:
            getattr(r, method)(*args)

    def on_stage(self, *args): self._all("on_stage", *args)
    def on_arms(self, *args): self._all("on_arms", *args)
    def on_step(self, *args): self._all("on_step", *args)
    def on_round(self, *args): self._all("on_round", *args)
    def on_eval(self, *args): self._all("on_eval", *args)
    def on_message(self, *args): self._all("on_message", *args)
    def close(self): self._all("close")


class TensorBoardReporter(Reporter):
    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir)
        self.arm_labels: list[str] = []

    def on_arms(self, labels):
        self.arm_labels = list(labels)

    def add_text(self, tag: str, text: str) -> None:
        # Markdown: indent so that gin text keeps its lines
        self.writer.add_text(tag, "    " + text.replace("\n", "\n    "))

    def on_step(self, stage, step, losses, lr):
        for term, value in losses.items():
            self.writer.add_scalar(f"{stage}/loss/{term}", value, step)
        self.writer.add_scalar(f"{stage}/lr", lr, step)

    def on_round(self, result: RoundResult):
        r = result.round
        self.writer.add_scalar("round/arm", result.arm, r)
        if result.reward is not None:
            self.writer.add_scalar("round/reward", result.reward, r)
        for term, value in result.totals.items():
            self.writer.add_scalar(f"round/loss/{term}", value, r)
        for stat, values in result.diagnostics.items():
            if values.dim() == 0:
                self.writer.add_scalar(f"policy/{stat}", float(values), r)
            else:
                for label, v in zip(self.arm_labels, values.tolist()):
                    self.writer.add_scalar(f"policy/{stat}/{label}", v, r)

    def on_eval(self, network, metrics):
        for name, value in metrics.items():
            self.writer.add_scalar(f"eval/{network}/{name}", value, 0)

    def close(self):
        self.writer.close()
