"""Predictions files: reading them, choosing the metric, matching instances across models.

Two formats are read, and may be mixed in one comparison:
- eval.py's JSON Lines, one record per instance with at least `id`, `task` and `prediction`,
  and `correct` (bool, where defined) and `score` (float);
- lm-evaluation-harness sample files (harness.py).
`read_run` gives both as records with `metrics` (name -> value, named as the harness names
them: "acc,none", "exact_match,strict-match"), `outputs` (metric -> the output it scores,
where that is not `prediction`: acc_norm's choice, an extracted answer), `line` (where the record starts) and `doc` (the
document's position in the evaluated split, where known). The compatibility metrics compare
models instance by instance, so `align` refuses runs of different tasks or documents rather
than compare mismatched instances. No torch.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import files
import harness
import metrics

ROLES = ("old", "new", "compat")
_POSITION = re.compile(r"/(\d+)$")  # eval.py's ids end with the item's position: "piqa/validation/17"


def check_record(record: Any, where: str) -> None:
    """Refuse a record that is not an object with `id` (str or int), `task` and `prediction`."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a prediction record must be a JSON object, got {type(record).__name__}")
    missing = [key for key in ("id", "task", "prediction") if key not in record]
    if missing:
        raise ValueError(f"{where}: prediction record lacks {missing} (eval.py writes id, task, "
                         "prediction, correct, score; lm-eval --log_samples writes doc_id, doc_hash, ...)")
    if not isinstance(record["id"], (str, int)):
        raise ValueError(f"{where}: id must be a string or an integer, got {record['id']!r}")
    for key in ("correct", "correct_norm", "correct_flexible"):
        if record.get(key) is not None and not isinstance(record[key], bool):
            raise ValueError(f"{where}: `{key}` must be true, false or null, got {record[key]!r:.60} "
                             f"(eval.py writes booleans; a number belongs in `score`)")


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path} (eval.py writes one per model; "
                                "lm-eval --log_samples writes samples_<task>_<date>.jsonl)")
    return path


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed JSON) of every non-blank line; a line that is not JSON is an error."""
    parsed = []
    for number, line in enumerate(files.read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            parsed.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}); each line must be one "
                             "prediction record") from None
    return parsed


def read_predictions(path: str | Path) -> list[dict]:
    """The prediction records of a JSON Lines file written by eval.py, as written (blank lines skipped)."""
    path = _existing(path)
    records = []
    for number, record in _read_jsonl(path):
        check_record(record, f"{path}:{number}")
        records.append(record)
    return records


def metric_values(record: dict) -> dict[str, float]:
    """An eval.py record's metrics under the harness's names; the first is the task's own metric.

    Multiple choice: `correct` is acc, `correct_norm` acc_norm. Exact match: `correct` is the
    strict-match filter, `correct_flexible` flexible-extract. `score` (ROUGE-1 for summaries) is
    "score,none". A record read by `read_run` carries them already.
    """
    if "metrics" in record:
        return record["metrics"]
    names = {"correct": "acc,none", "correct_norm": "acc_norm,none"}
    if "correct_flexible" in record:
        names = {"correct": "exact_match,strict-match", "correct_flexible": "exact_match,flexible-extract"}
    values = {name: float(record[key]) for key, name in names.items() if isinstance(record.get(key), bool)}
    score = record.get("score")
    if isinstance(score, (int, float)) and not isinstance(score, bool):
        values["score,none"] = float(score)
    return values


# eval.py's fields holding the output a metric scores where that is not `prediction`.
_OUTPUTS = {"acc_norm_prediction": "acc_norm,none", "extracted_strict": "exact_match,strict-match",
            "extracted_flexible": "exact_match,flexible-extract"}


def outputs_of(record: dict) -> dict[str, Any]:
    """metric -> the output it scores, where that is not `prediction`: acc_norm's choice, and for
    exact match the answer each filter extracts from the generated text. A record read by
    `read_run` carries them already."""
    if "outputs" in record:
        return record["outputs"]
    return {name: record[key] for key, name in _OUTPUTS.items() if key in record}


def answer(record: dict, metric: str | None) -> Any:
    """The model's answer as `metric` scores it, which the flip metrics compare across models
    (yhat of the paper's NFR_ext): acc_norm's choice; for exact match the extracted answer as
    the metric compares it (GSM8K's normalisation: "18." and "$18" are 18); else `prediction`."""
    output = outputs_of(record).get(metric, record["prediction"])
    if metric is not None and metric.split(",")[0] == "exact_match" and isinstance(output, str):
        return metrics.normalize_answer(output)
    return output


def _own_record(record: dict, number: int) -> dict:
    position = _POSITION.search(record["id"]) if isinstance(record["id"], str) else None
    return {**record, "metrics": metric_values(record), "outputs": outputs_of(record), "line": number,
            "doc": int(position[1]) if position else None}


def read_run(path: str | Path) -> list[dict]:
    """The records of one predictions file of either format, with `metrics`, `line` and `doc`."""
    path = _existing(path)
    lines = _read_jsonl(path)
    if not lines:
        raise ValueError(f"{path}: empty file, no records: evaluate the model again (eval.py --out "
                         "FILE, or lm-eval --log_samples)")
    if harness.is_sample_line(lines[0][1]):
        return [{**record, "doc": record["id"]} for record in harness.read_samples(path, lines)]
    for number, record in lines:
        check_record(record, f"{path}:{number}")
    return [_own_record(record, number) for number, record in lines]


def resolve_metric(records: Sequence[dict], metric: str | None, name: str) -> str:
    """The full "metric,filter" key that `metric` names in the first record (None: its first metric;
    "acc": the first filter that has acc)."""
    available = list(metric_values(records[0]))
    corpus = records[0].get("corpus_metrics", [])
    where = f"{name}, line {records[0]['line']}" if "line" in records[0] else name
    if not available:
        only = f"; only metrics computed over the whole corpus ({', '.join(corpus)})" if corpus else ""
        raise ValueError(f"{where}: the record has no per-instance numeric metric (no boolean `correct`, "
                         f"no `score`{only}), so there is nothing to compare instance by instance")
    if metric is None:
        return available[0]
    def named(key: str) -> bool:  # "acc" names "acc,none"; "acc,none" names itself
        return key == metric or key.split(",")[0] == metric

    matches = [key for key in available if named(key)]
    if not matches and any(named(key) for key in corpus):
        raise ValueError(f"{where}: metric {metric!r} is computed over the whole corpus (each sample logs its "
                         "inputs to it, not a score), so no instance has a value of its own; pass --metric "
                         f"with one of {', '.join(available)}")
    if not matches:
        raise ValueError(f"{where}: no metric {metric!r} in the records (they have {', '.join(available)}); "
                         "pass --metric with one of those")
    return matches[0]


def with_metric(runs: dict[str, Sequence[dict]], metric: str, names: dict[str, str]) -> dict[str, list[dict]]:
    """The runs with `correct` and `score` taken from `metric`: `score` its value, `correct`
    whether it is 1 when every value of every run is 0 or 1 (a discrete metric), else None."""
    for role, records in runs.items():
        lacking = next((r for r in records if metric not in metric_values(r)), None)
        if lacking is not None:
            where = f"{names[role]}, line {lacking.get('line', '?')} (id {lacking['id']!r})"
            raise ValueError(f"{where}: no metric {metric!r} (it has {', '.join(metric_values(lacking))}); "
                             "pass --metric with a metric every file has")
    values = {role: [metric_values(r)[metric] for r in records] for role, records in runs.items()}
    discrete = all(v in (0.0, 1.0) for vs in values.values() for v in vs)
    return {role: [{**r, "score": v, "correct": v == 1.0 if discrete else None} for r, v in zip(records, vs)]
            for (role, records), vs in zip(runs.items(), values.values())}


def _key(run_formats: set[bool]) -> str:
    """Match by id within one format; across formats by the document's position in the split."""
    return "id" if len(run_formats) == 1 else "doc"


def _index(records: Sequence[dict], name: str, key: str) -> dict:
    """key -> record for one run, checking it is non-empty, of one task, keys unique and known."""
    if not records:
        raise ValueError(f"{name}: no prediction records (empty input)")
    for number, record in enumerate(records, 1):
        check_record(record, f"{name} record {number}")
        if record.get(key) is None:
            raise ValueError(f"{name}, id {record['id']!r}: comparing eval.py records with harness samples "
                             "matches them by the item's position in the split, and this id does not end "
                             "with one (eval.py writes '<task>/<split>/<position>'); compare files of one format")
    duplicates = [i for i, count in Counter(r[key] for r in records).items() if count > 1]
    if duplicates:
        first = next(r for r in records if r[key] == duplicates[0])
        where = f", line {first['line']}" if "line" in first else ""
        raise ValueError(f"{name}{where}: {len(duplicates)} ids appear more than once, e.g. {duplicates[:3]}; "
                         "each instance must be predicted once: keep one record per id")
    return {r[key]: r for r in records}


def check_tasks(runs: dict[str, Sequence[dict]], names: dict[str, str]) -> None:
    """Refuse a run of several tasks, or runs of different tasks (a renamed harness file, of
    task None, matches any)."""
    tasks = {}
    for role, records in runs.items():
        found = sorted({str(r["task"]) for r in records if r.get("task") is not None})
        if len(found) > 1:
            raise ValueError(f"{names[role]}: records of several tasks {found}; compare one task at a time")
        tasks[role] = found[0] if found else None
    for role, task in tasks.items():
        if None not in (task, tasks["old"]) and task != tasks["old"]:
            raise ValueError(f"{names[role]} holds task {task!r} but {names['old']} holds "
                             f"{tasks['old']!r}: compare predictions of the same task")


def _same_document(old: dict, other: dict) -> bool:
    """doc_hash where both runs come from the harness, else the gold answer (eval.py's `gold` or
    `reference`, the harness's `target`)."""
    if "doc_hash" in old and "doc_hash" in other:
        return old["doc_hash"] == other["doc_hash"]
    gold = [str(r.get("gold", r.get("reference"))) for r in (old, other)]
    return gold[0] == gold[1]


def _check_documents(old: list[dict], other: list[dict], names: tuple[str, str]) -> None:
    """Refuse, naming the first mismatch, when two runs' matched records are not the same documents."""
    for a, b in zip(old, other):
        if not _same_document(a, b):
            what = ("doc_hash " + a["doc_hash"][:12] + "... vs " + b["doc_hash"][:12] + "..."
                    if "doc_hash" in a and "doc_hash" in b
                    else f"gold {a.get('gold', a.get('reference'))!r:.40} vs {b.get('gold', b.get('reference'))!r:.40}")
            raise ValueError(f"{names[0]}, line {a.get('line', '?')} and {names[1]}, line {b.get('line', '?')} "
                             f"(id {a['id']!r}) are different documents ({what}): the files were not made "
                             "on the same task data; evaluate both models on the same split")


def align(runs: dict[str, Sequence[dict]], names: dict[str, str]) -> dict[str, list[dict]]:
    """The records of every run (role -> records), in the old run's order; the same task and the
    same documents everywhere. `names` (role -> label) names the runs in error messages."""
    key = _key({"doc_hash" in records[0] for records in runs.values() if records})
    indexes = {role: _index(records, names[role], key) for role, records in runs.items()}
    check_tasks(runs, names)
    old = indexes["old"]
    for role, index in indexes.items():
        only_old = [i for i in old if i not in index]
        only_here = [i for i in index if i not in old]
        if only_old or only_here:
            raise ValueError(
                f"{names['old']} has {len(old)} records and {names[role]} has {len(index)}: "
                f"{len(only_old)} ids only in old (e.g. {only_old[:3]}), {len(only_here)} only in "
                f"{role} (e.g. {only_here[:3]}); compare predictions of the same instances")
    aligned = {role: [index[i] for i in old] for role, index in indexes.items()}
    for role in aligned:
        _check_documents(aligned["old"], aligned[role], (names["old"], names[role]))
    return aligned
