"""Predictions in a task's official results format (`Task.predictions_file`,
`Task.predictions`), written at the end of a run and by `optima eval`.

The file's extension decides the layout: `.json` is a JSON list of the records
(VQA v2's and COCO captions' results files), `.csv` is one line per record of
its values in order, without a header (NLVR2's `identifier,prediction`).
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Mapping, Sequence

from optima.checkpoint import write_text_atomic
from optima.errors import ConfigError

FORMATS = (".json", ".csv")


def _format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ConfigError(f"predictions file {path}: unknown format {ext or '(no extension)'}; "
                          f"a task's predictions_file ends in {' or '.join(FORMATS)}")
    return ext


def dumps(records: Sequence[Mapping[str, Any]], path: str) -> str:
    """The text of `records` in the format of `path`'s extension."""
    if _format(path) == ".json":
        return json.dumps(list(records), ensure_ascii=False)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for r in records:
        writer.writerow(list(r.values()))
    return out.getvalue()


def write(records: Sequence[Mapping[str, Any]], path: str) -> str:
    """Write `records` to `path` atomically (a failure leaves what was there); returns `path`."""
    write_text_atomic(path, dumps(records, path))
    return path


def read(path: str) -> list[Any]:
    """A predictions file back: the JSON list, or the CSV's rows as lists of strings."""
    with open(path, encoding="utf-8", newline="") as f:
        if _format(path) == ".json":
            return json.load(f)
        return [row for row in csv.reader(f) if row]
