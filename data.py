"""The four tasks of the paper (PIQA, HellaSwag, GSM8K, SAMSum): reading, prompts, training batches.

Reading. `load_task(task, split, data_dir)` reads the upstream files from a local directory laid
out as `LAYOUT` says, or, with `data_dir=None`, downloads a pinned hub copy (`HUB`) with
huggingface_hub; the hub's parquet files need the optional `pyarrow`. Both sources give the same
items. Splits are "train", "validation" and "test"; each task evaluates on `TASKS[task].eval_split`
(the split lm-evaluation-harness v0.4.3 scores). Item ids are stable strings:
"piqa/validation/17" (row index) for PIQA, HellaSwag and GSM8K, "samsum/test/13862856" (the
corpus's own id) for SAMSum.

Prompts, exactly as the harness v0.4.3 builds them (its `lm_eval/tasks/<task>` YAML files):
- PIQA: "Question: " + goal + "\\nAnswer:", choices [sol1, sol2], gold = label.
- HellaSwag: `_hellaswag_preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`,
  choices preprocessed endings, gold = int(label) (a string on the hub).
- GSM8K: "Question: " + question + "\\nAnswer:", target " " + answer (the whole solution, with
  its <<...>> annotations and "#### N"), reference the answer.
- SAMSum (no harness task; the paper's template is unpublished): "Dialogue: " + dialogue +
  "\\nSummary:", target " " + summary, reference the summary as the corpus has it. Dialogues
  separate turns by "\\r\\n" in most records and by "\\n" in the rest; we normalise to "\\n" and
  strip the ends so the model sees one separator whatever the record. No dialogue of the corpus
  holds a blank line once normalised, so "\\n\\n" (a stop string) marks only the end of a
  summary. The target summary is normalised the same way and stripped: many train summaries end
  in spaces and a few in "\\r\\n" or "\\n\\n", which would teach the model to emit the stop string.
  ROUGE tokenises on words, so the raw reference scores the same. SAMSum's one empty train
  dialogue (id 13828807) is kept as the corpus has it.
Few-shot (`add_fewshot`): the harness's k-shot prompts, shots drawn from the train split with one
`random.Random(1234)` across the documents in order, each shot context + target + "\n\n".

Training (paper section 5, appendix A.1): `training_pair` gives (context, target), the loss is on
every token by default (`mask_context` masks the context), `split_train_val` makes the seeded
80/20 split, `encode_pairs` tokenises with left truncation, `batches` + `collate` pad.
Padding vs packing: we pad, with length bucketing (sort inside shuffled windows of 64 batches).
Padding keeps one sequence per row, so attention never crosses examples and the per-token loss
is exact; bucketing leaves little padding on the paper's tasks (bench/RESULTS.md), so packing
would save little and would need cross-example attention masks.

Other tasks join with `register_task(Task(..., loader=f))`, where `f(split, data_dir)` returns
the items; toy.py registers its toy tasks so when it is imported (train.py and eval.py do).
"""
from __future__ import annotations

import csv
import io
import json
import random
import re
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

import files


@dataclass
class MultipleChoice:
    """A log-likelihood multiple-choice item; choices carry no leading space (the scorer adds it)."""
    id: str
    context: str
    choices: list[str]
    gold: int


@dataclass
class Generation:
    """A generation item; target is the training continuation (" " + answer)."""
    id: str
    prompt: str
    references: list[str]
    target: str


Item = MultipleChoice | Generation
Loader = Callable[[str, "str | Path | None"], list]


@dataclass(frozen=True)
class Task:
    """How a task is read, scored and decoded (the paper, appendix A.3)."""
    name: str
    kind: str  # "multiple_choice" | "generation"
    eval_split: str
    loader: Loader  # (split, data_dir) -> list of items
    metric: str = "acc"  # "acc" (and acc_norm) | "exact_match" | "rouge1"
    max_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    no_repeat_ngram_size: int = 0


# ---------------------------------------------------------------- where the files are
LAYOUT = """expected --data-dir layout (the upstream files, unchanged):
  piqa/train.jsonl, piqa/train-labels.lst, piqa/valid.jsonl, piqa/valid-labels.lst
  hellaswag/hellaswag_train.jsonl, hellaswag/hellaswag_val.jsonl
  gsm8k/train.jsonl, gsm8k/test.jsonl
  samsum/train.json, samsum/val.json, samsum/test.json"""


@dataclass(frozen=True)
class HubCopy:
    """A hub dataset repository holding a copy of a task's files, pinned to one commit, and
    `source`: where public code names that commit for that repo."""
    repo: str
    revision: str
    files: dict[str, str]  # split -> file name in the repo
    source: str


HUB = {
    "piqa": HubCopy("ybisk/piqa", "142c51238b3ca2bc61e9a075913871b8b600e8e1",  # refs/convert/parquet
                    {s: f"plain_text/{s}/0000.parquet" for s in ("train", "validation")},
                    "hf_revision of a public lighteval PIQA task; plain_text/validation/0000.parquet "
                    "at this revision in a public list of pinned eval files"),
    "hellaswag": HubCopy("Rowan/hellaswag", "218ec52e09a7e7462a5400043bb9a69a41d06b76",  # main
                         {s: f"data/{s}-00000-of-00001.parquet" for s in ("train", "validation")},
                         "public code that fetches data/validation-00000-of-00001.parquet (10,042 rows) "
                         "at this commit, public DATASET_REVISIONS dicts"),
    "gsm8k": HubCopy("openai/gsm8k", "cc7b047b6e5bb11b4f1af84efc572db110a51b3c",
                     {s: f"main/{s}-00000-of-00001.parquet" for s in ("train", "test")},
                     "inspect_evals' gsm8k pin (quoted in public tests), its datasets cache directory"),
    "samsum": HubCopy("knkarthick/samsum", "6b929ff10edec703164e3ddb2e94aae058c9ab5f",
                      {s: f"{s}.csv" for s in ("train", "validation", "test")},
                      "AIwaterpiggy/SHEER README.md (SAMSum data, pinned revision, read from its CSV "
                      "files), its datasets cache directory in public docs"),
}
LOCAL = {
    "piqa": {"train": "piqa/train.jsonl", "validation": "piqa/valid.jsonl"},
    "hellaswag": {"train": "hellaswag/hellaswag_train.jsonl",
                  "validation": "hellaswag/hellaswag_val.jsonl"},
    "gsm8k": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
    "samsum": {"train": "samsum/train.json", "validation": "samsum/val.json",
               "test": "samsum/test.json"},
}
UNLABELED = {"piqa": "test", "hellaswag": "test"}  # public files exist, labels are hidden

Record = tuple[str, dict]  # (where: "file:line" for messages, the raw record)


# ---------------------------------------------------------------- file readers
def _read_jsonl(path: Path) -> list[Record]:
    records = []
    for n, line in enumerate(files.read_text(path).split("\n"), 1):
        if line.strip():
            records.append(_as_record(_parse_json(line, f"{path}:{n}"), f"{path}:{n}"))
    return records


def _read_json_array(path: Path) -> list[Record]:
    data = _parse_json(files.read_text(path), str(path))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return [_as_record(r, f"{path} record {i}") for i, r in enumerate(data)]


def _read_csv(path: Path) -> list[Record]:
    # newline="" lets the csv module keep the newlines inside quoted dialogue fields.
    reader = csv.DictReader(io.StringIO(files.read_text(path), newline=""))
    return [(f"{path}:{reader.line_num}", row) for row in reader]


def _read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading the hub's parquet files needs pyarrow: pip install pyarrow, "
                          "or pass --data-dir with the upstream files") from e
    return [(f"{path} row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]


_READERS = {".jsonl": _read_jsonl, ".json": _read_json_array, ".csv": _read_csv,
           ".parquet": _read_parquet}


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} "
                         f"column {e.colno})") from e


def _as_record(value, where: str) -> Record:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return where, value


def _attach_piqa_labels(records: list[Record], jsonl: Path) -> None:
    """PIQA keeps labels in X-labels.lst, one 0/1 per line aligned with X.jsonl."""
    path = _existing(jsonl.with_name(jsonl.stem + "-labels.lst"))
    lines = [line.strip() for line in files.read_text(path).splitlines()]
    if len(lines) != len(records):
        raise ValueError(f"{path} has {len(lines)} labels but {jsonl} has {len(records)} records: "
                         "the two files must align line by line")
    for n, ((_, record), label) in enumerate(zip(records, lines), 1):
        if label not in ("0", "1"):
            raise ValueError(f"{path}:{n}: label {label!r} is not 0 or 1")
        record["label"] = int(label)


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {LAYOUT}")
    return path


def _hub_file(copy: HubCopy, split: str) -> Path:
    import huggingface_hub

    try:
        return Path(huggingface_hub.hf_hub_download(copy.repo, copy.files[split], repo_type="dataset",
                                                    revision=copy.revision))
    except Exception as e:  # offline, missing file, rate limit: all end in the same advice
        raise OSError(f"could not download {copy.files[split]} of the hub dataset {copy.repo} at "
                      f"{copy.revision} ({e}); pass --data-dir with the upstream files instead; "
                      f"{LAYOUT}") from e


# ---------------------------------------------------------------- records -> items
def _field(record: dict, name: str, where: str, kind: type = str):
    if name not in record:
        raise ValueError(f"{where}: field {name!r} missing (fields: {sorted(record)})")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: field {name!r} should be {kind.__name__}, "
                         f"got {type(value).__name__} {value!r:.60}")
    return value


def _label(record: dict, n_choices: int, where: str) -> int:
    value = record.get("label")
    if isinstance(value, str) and value.strip().isdigit():  # the hub's parquet copies use "0".."3"
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n_choices:
        raise ValueError(f"{where}: field 'label' should be an int in 0..{n_choices - 1}, got "
                         f"{value!r} (test files have no labels)")
    return value


def _piqa_item(record: dict, id: str, where: str) -> MultipleChoice:
    choices = [_field(record, "sol1", where), _field(record, "sol2", where)]
    return MultipleChoice(id, "Question: " + _field(record, "goal", where) + "\nAnswer:",
                          choices, _label(record, 2, where))


def _hellaswag_preprocess(text: str) -> str:
    """The harness's cleanup; the brackets are WikiHow artifacts ("[title]", "[header]", ...)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_item(record: dict, id: str, where: str) -> MultipleChoice:
    endings = _field(record, "endings", where, list)
    if len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        raise ValueError(f"{where}: field 'endings' should be a list of 4 strings, got {endings!r:.80}")
    ctx = _field(record, "ctx_a", where) + " " + _field(record, "ctx_b", where).capitalize()
    context = _hellaswag_preprocess(_field(record, "activity_label", where) + ": " + ctx)
    return MultipleChoice(id, context, [_hellaswag_preprocess(e) for e in endings],
                          _label(record, 4, where))


def _gsm8k_item(record: dict, id: str, where: str) -> Generation:
    answer = _field(record, "answer", where)
    if not re.search(r"#### *-?[\d.,$]*\d", answer):  # strict-match scores the number after "####"
        raise ValueError(f"{where}: field 'answer' has no final '#### N' line (got ...{answer[-60:]!r}); "
                         f"GSM8K's strict match scores that number, so every answer needs one")
    return Generation(id, "Question: " + _field(record, "question", where) + "\nAnswer:",
                      [answer], " " + answer)


def _samsum_item(record: dict, id: str, where: str) -> Generation:
    def clean(text: str) -> str:  # see the module docstring
        return text.replace("\r\n", "\n").strip()

    summary = _field(record, "summary", where)
    return Generation(id, "Dialogue: " + clean(_field(record, "dialogue", where)) + "\nSummary:",
                      [summary], " " + clean(summary))


_ITEMS = {"piqa": _piqa_item, "hellaswag": _hellaswag_item, "gsm8k": _gsm8k_item,
         "samsum": _samsum_item}


def _load_builtin(name: str, split: str, data_dir: str | Path | None = None) -> list[Item]:
    """Read one split of a paper task from `data_dir` (upstream files) or the pinned hub copy."""
    if split == UNLABELED.get(name):
        raise ValueError(f"{name}'s {split} labels are hidden by its authors, so it cannot be "
                         f"scored; use split {TASKS[name].eval_split!r}, which the harness scores")
    if split not in LOCAL[name]:
        raise ValueError(f"{name} has no split {split!r}; choose one of {sorted(LOCAL[name])}")
    local = data_dir is not None
    path = _existing(Path(data_dir) / LOCAL[name][split]) if local else _hub_file(HUB[name], split)
    records = _READERS[path.suffix](path)
    if name == "piqa" and local and records:  # the hub's copy has a label column instead
        _attach_piqa_labels(records, path)
    items = []
    for i, (where, record) in enumerate(records):
        key = _field(record, "id", where) if name == "samsum" else str(i)
        items.append(_ITEMS[name](record, f"{name}/{split}/{key}", where))
    return items


# ---------------------------------------------------------------- the registry
TASKS: dict[str, Task] = {
    "piqa": Task("piqa", "multiple_choice", "validation", partial(_load_builtin, "piqa")),
    "hellaswag": Task("hellaswag", "multiple_choice", "validation",
                      partial(_load_builtin, "hellaswag")),
    "gsm8k": Task("gsm8k", "generation", "test", partial(_load_builtin, "gsm8k"),
                  metric="exact_match", max_new_tokens=256,
                  stop=("Question:", "</s>", "<|im_end|>")),
    # 128 new tokens: the longest val/test summary is 59 words (300 bytes, ~80 Llama tokens).
    "samsum": Task("samsum", "generation", "test", partial(_load_builtin, "samsum"),
                   metric="rouge1", max_new_tokens=128, no_repeat_ngram_size=2,
                   stop=("Dialogue:", "Summary:", "</s>", "\n\n")),
}


def register_task(task: Task) -> None:
    """Add a task to `TASKS` (toy.py adds its toy tasks when imported); a name is registered once."""
    if TASKS.get(task.name, task) != task:
        raise ValueError(f"a different task named {task.name!r} is already registered")
    TASKS[task.name] = task


def task_names() -> list[str]:
    """Every registered task name."""
    return sorted(TASKS)


def get_task(task: str | Task) -> Task:
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
    return TASKS[task]


def load_task(task: str | Task, split: str, data_dir: str | Path | None = None) -> list[Item]:
    """The items of one split, in file order; raises if the split has none."""
    spec = get_task(task)
    items = spec.loader(split, data_dir)
    if not items:
        raise ValueError(f"task {spec.name!r} split {split!r} is empty (data_dir={data_dir})")
    return items


# ---------------------------------------------------------------- prompts for training and few-shot
def training_pair(task: str | Task, item: Item) -> tuple[str, str]:
    """(context, target) of a training sequence: the gold choice or the target continuation."""
    spec = get_task(task)
    expected = MultipleChoice if spec.kind == "multiple_choice" else Generation
    if not isinstance(item, expected):
        raise ValueError(f"task {spec.name!r} is {spec.kind} but got a {type(item).__name__} item")
    if isinstance(item, MultipleChoice):
        return item.context, " " + item.choices[item.gold]
    return item.prompt, item.target


def fewshot_prefix(task: str | Task, shots: Sequence[Item], k: int,
                   rng: random.Random | int = 1234) -> str:
    """The harness's few-shot prefix: k shots drawn with `rng.sample`, each shot "context target\\n\\n".

    Pass one `random.Random` for a whole evaluation to get the harness's draws: it seeds one
    generator (seed 1234) and draws every document's shots from it in document order
    (`add_fewshot` does that).
    """
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    if not 0 <= k <= len(shots):
        raise ValueError(f"cannot draw {k} shots from {len(shots)} training items")
    return "".join(c + t + "\n\n" for c, t in (training_pair(task, s) for s in rng.sample(shots, k)))


def add_fewshot(task: str | Task, items: Iterable[Item], shots: Sequence[Item], k: int,
                seed: int = 1234) -> list[Item]:
    """`items` with a k-shot prefix (from `shots`, the train split) before each context/prompt."""
    if k == 0:
        return list(items)
    rng = random.Random(seed)
    out = []
    for item in items:
        prefix = fewshot_prefix(task, shots, k, rng)
        if isinstance(item, MultipleChoice):
            out.append(replace(item, context=prefix + item.context))
        else:
            out.append(replace(item, prompt=prefix + item.prompt))
    return out


def split_train_val(items: Sequence, seed: int = 0, frac: float = 0.8) -> tuple[list, list]:
    """The paper's seeded 80/20 split of a training set (appendix A.1), each part in file order."""
    if not 0 < frac < 1 or len(items) < 2:
        raise ValueError(f"need 0 < frac < 1 and at least 2 items, got frac={frac}, {len(items)} items")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_train = min(max(round(frac * len(items)), 1), len(items) - 1)
    return ([items[i] for i in sorted(order[:n_train])],
            [items[i] for i in sorted(order[n_train:])])


# ---------------------------------------------------------------- tokenisation and batches
Example = tuple[list[int], list[int]]  # (input_ids, labels)


def _encode(tokenizer, context: str, target: str, max_len: int,
            mask_context: bool) -> tuple[list[int], list[int], bool]:
    # EOS ends every sequence: generation has to learn to stop, not only the stop strings.
    ids = tokenizer.encode(context + target) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    labels = list(ids)
    if mask_context:  # the context's tokens as the harness finds them: encode it alone
        n_context = min(len(tokenizer.encode(context)), len(ids))
        labels[:n_context] = [-100] * n_context
    if len(ids) <= max_len:
        return ids, labels, False
    # Truncate the context from the left, keeping a leading BOS so the sequence still starts
    # as the model expects; the target is whole unless it alone is longer than max_len.
    keep = 1 if tokenizer.bos_id is not None and ids[0] == tokenizer.bos_id else 0
    cut = len(ids) - max_len
    return ids[:keep] + ids[keep + cut:], labels[:keep] + labels[keep + cut:], True


def answer_length(tokenizer, context: str, target: str) -> int:
    """The fewest tokens that hold the whole answer of a training sequence: its leading BOS, the
    target's tokens and EOS. `encode_pair` cuts the context first, so at a max_len below this
    the answer loses its start, and the sequence keeps no question at all."""
    ids = tokenizer.encode(context + target)
    keep = 1 if tokenizer.bos_id is not None and ids[:1] == [tokenizer.bos_id] else 0
    answer = len(ids) - min(len(tokenizer.encode(context)), len(ids))
    return keep + answer + (tokenizer.eos_id is not None)


def encode_pair(tokenizer, context: str, target: str, max_len: int,
                mask_context: bool = False) -> Example:
    """(input_ids, labels) of context + target + EOS, at most max_len tokens.

    Labels are the input ids (the loss shifts them); with mask_context the context's labels are
    -100 (the paper puts the loss on every token, section 5, so the default is False).
    """
    ids, labels, _ = _encode(tokenizer, context, target, max_len, mask_context)
    return ids, labels


def encode_pairs(tokenizer, pairs: Iterable[tuple[str, str]], max_len: int,
                 mask_context: bool = False) -> tuple[list[Example], int]:
    """`encode_pair` over many pairs, with the number that had to be truncated (to log)."""
    examples, truncated = [], 0
    for context, target in pairs:
        ids, labels, cut = _encode(tokenizer, context, target, max_len, mask_context)
        examples.append((ids, labels))
        truncated += cut
    return examples, truncated


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids (pad_id), attention_mask, labels (-100 on pads)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, :len(lab)] = torch.tensor(lab, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(examples: Sequence[Example], batch_size: int, shuffle: bool = True, seed: int = 0,
            window: int = 64) -> list[list[Example]]:
    """Batches of similar lengths: shuffle, sort inside windows of `window` batches, shuffle batches.

    Every example is in exactly one batch; the same seed gives the same batches (pass the epoch
    as the seed). Without shuffle the examples keep their order (evaluation of the val loss).
    """
    order = list(range(len(examples)))
    if not shuffle:
        return [[examples[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(order)
    span = batch_size * window
    groups = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: len(examples[i][0]))
        groups += [chunk[s:s + batch_size] for s in range(0, len(chunk), batch_size)]
    rng.shuffle(groups)
    return [[examples[i] for i in group] for group in groups]


def padding_waste(batch_list: Iterable[Sequence[Example]]) -> float:
    """Fraction of the padded tokens of `batch_list` that are padding."""
    real = padded = 0
    for batch in batch_list:
        lengths = [len(ids) for ids, _ in batch]
        real += sum(lengths)
        padded += max(lengths) * len(lengths)
    return 1 - real / padded if padded else 0.0
