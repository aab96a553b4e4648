"""`optima export`: a finished run's student as files its own library loads
(CoCa: open_clip), its task head and a model card (`optima.export`)."""
from __future__ import annotations

import os

from rich.console import Console

console = Console()


def export_command(run_dir: str, out: str, stage: str | None, name: str | None, *, card: bool = True,
                   external_plugins: bool | None = None) -> dict:
    from optima.export import CARD_FILE, EXPORT_RECORD, export_run

    record = export_run(run_dir, out, stage=stage, name=name, external_plugins=external_plugins, card=card,
                        on_message=console.print)
    files = [*record["model"]["files"], record["head"]["file"], *([CARD_FILE] if card else []), EXPORT_RECORD]
    console.print(f"exported stage [bold]{record['stage']}[/] of {run_dir} to {out}: {', '.join(files)}")
    for net, metrics in record["metrics"].items():
        console.print(f"  {net}: " + ", ".join(f"test {k} {v:.4f}" for k, v in metrics.items()))
    console.print("load it without OPTIMA:")
    console.print(f"  python -c \"{record['model']['load']}\"", markup=False, soft_wrap=True)
    if card:
        console.print(f"model card: {os.path.join(out, CARD_FILE)}")
    return record
