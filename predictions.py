"""Predictions files: reading them, checking their records, matching instances across models.

A predictions file is JSON Lines, one record per instance, with at least `id`, `task` and
`prediction`, and `correct` (bool, where defined) and `score` (float) for the report. The
compatibility metrics compare models instance by instance, so the runs of one report must hold
the same task and the same ids; `align` refuses anything else rather than compare mismatched
instances. No torch.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

ROLES = ("old", "new", "compat")


def check_record(record: Any, where: str) -> None:
    """Refuse a record that is not an object with `id` (str or int), `task` and `prediction`."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a prediction record must be a JSON object, got {type(record).__name__}")
    missing = [key for key in ("id", "task", "prediction") if key not in record]
    if missing:
        raise ValueError(f"{where}: prediction record lacks {missing} (eval.py writes id, task, "
                         "prediction, correct, score)")
    if not isinstance(record["id"], (str, int)):
        raise ValueError(f"{where}: id must be a string or an integer, got {record['id']!r}")


def read_predictions(path: str | Path) -> list[dict]:
    """The prediction records of a JSON Lines file written by eval.py (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path} (eval.py writes one per model)")
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}); "
                                 "each line must be one prediction record") from None
            check_record(record, f"{path}:{number}")
            records.append(record)
    return records


def _index(records: Sequence[dict], name: str) -> dict:
    """id -> record for one predictions file, checking it is non-empty, of one task, ids unique."""
    if not records:
        raise ValueError(f"{name}: no prediction records (empty input)")
    for number, record in enumerate(records, 1):
        check_record(record, f"{name} record {number}")
    duplicates = [i for i, count in Counter(r["id"] for r in records).items() if count > 1]
    if duplicates:
        raise ValueError(f"{name}: {len(duplicates)} ids appear more than once, e.g. {duplicates[:3]}; "
                         "each instance must be predicted once")
    tasks = sorted({str(r["task"]) for r in records})
    if len(tasks) > 1:
        raise ValueError(f"{name}: records of several tasks {tasks}; compare one task at a time")
    return {r["id"]: r for r in records}


def align(runs: dict[str, Sequence[dict]], names: dict[str, str]) -> dict[str, list[dict]]:
    """The records of every run (role -> records), in the old run's order; the same task and the
    same ids everywhere. `names` (role -> label) names the runs in error messages."""
    indexes = {role: _index(records, names[role]) for role, records in runs.items()}
    old = indexes["old"]
    task = next(iter(old.values()))["task"]
    for role, index in indexes.items():
        other_task = next(iter(index.values()))["task"]
        if other_task != task:
            raise ValueError(f"{names[role]} holds task {other_task!r} but {names['old']} holds "
                             f"{task!r}: compare predictions of the same task")
        only_old = [i for i in old if i not in index]
        only_here = [i for i in index if i not in old]
        if only_old or only_here:
            raise ValueError(
                f"{names['old']} has {len(old)} records and {names[role]} has {len(index)}: "
                f"{len(only_old)} ids only in old (e.g. {only_old[:3]}), {len(only_here)} only in "
                f"{role} (e.g. {only_here[:3]}); compare predictions of the same instances")
    return {role: [index[i] for i in old] for role, index in indexes.items()}
