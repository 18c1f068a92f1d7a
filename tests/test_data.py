"""data.py: readers on the real upstream files, prompt formats, the hub path (faked), errors,
few-shot prompts, the train/val split, tokenisation with truncation, padding and batching."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
from data import Generation, MultipleChoice

ROOT = Path(__file__).resolve().parent.parent


class ByteTokenizer:
    """Bytes-level tokenizer following the contract: id = byte + 3; 0 pad, 1 BOS, 2 EOS."""
    pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 259

    def __init__(self, add_bos: bool = True):
        self.add_bos = add_bos

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        bos = self.add_bos if add_bos is None else add_bos
        return [self.bos_id] * bos + [b + 3 for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i > 2).decode()


def byte_ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode()]


# ---------------------------------------------------------------- real files
def test_piqa_counts_labels_and_prompt(data_dir):
    train = data.load_task("piqa", "train", data_dir)
    valid = data.load_task("piqa", "validation", data_dir)
    assert (len(train), len(valid)) == (16113, 1838)
    assert [sum(i.gold == g for i in train) for g in (0, 1)] == [8053, 8060]
    assert [sum(i.gold == g for i in valid) for g in (0, 1)] == [910, 928]
    # Lines 1, 18 and 1838 of valid.jsonl with their labels 0, 1, 0 (valid-labels.lst).
    assert valid[0] == MultipleChoice(
        "piqa/validation/0",
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
        ["Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper "
         "strips, you will also need to supply it with a water bottle and a food dish.",
         "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans "
         "material, you will also need to supply it with a water bottle and a food dish."], 0)
    assert valid[17].context == "Question: How do you properly prepare a steak.\nAnswer:"
    assert valid[17].choices[1].startswith("Take the steak out of cold storage") and valid[17].gold == 1
    assert valid[1837] == MultipleChoice(
        "piqa/validation/1837", "Question: Where can I buy a tennis ball\nAnswer:",
        ["You can purchase a tennis ball at any sports store",
         "You can purchase a tennis racket at any sports store"], 0)
    assert train[16112].context == "Question: how do you frost a cupcake?\nAnswer:" and train[16112].gold == 0
    assert data.training_pair("piqa", valid[17]) == (valid[17].context, " " + valid[17].choices[1])


def test_gsm8k_counts_and_prompt(data_dir):
    train = data.load_task("gsm8k", "train", data_dir)
    test = data.load_task("gsm8k", "test", data_dir)
    assert (len(train), len(test)) == (7473, 1319)
    answer = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
              "clips altogether in April and May.\n#### 72")
    assert train[0] == Generation(
        "gsm8k/train/0",
        "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many "
        "clips in May. How many clips did Natalia sell altogether in April and May?\nAnswer:",
        [answer], " " + answer)
    assert test[1318].id == "gsm8k/test/1318" and test[1318].references[0].endswith("slices.\n#### 14")
    assert data.training_pair("gsm8k", train[0]) == (train[0].prompt, " " + answer)


def test_samsum_counts_prompt_and_newlines(data_dir):
    splits = {s: data.load_task("samsum", s, data_dir) for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 14732, "validation": 818, "test": 819}
    test = splits["test"]
    # test[0] separates turns by "\n" in the file, test[1] by "\r\n": both prompts use "\n".
    assert test[0].id == "samsum/test/13862856"
    assert test[0].prompt.startswith("Dialogue: Hannah: Hey, do you have Betty's number?\nAmanda: Lemme check\n")
    assert test[0].prompt.endswith("\nHannah: Bye\nAmanda: Bye bye\nSummary:")
    assert test[1] == Generation(
        "samsum/test/13729565",
        "Dialogue: Eric: MACHINE!\nRob: That's so gr8!\nEric: I know! And shows how Americans see "
        "Russian ;)\nRob: And it's really funny!\nEric: I know! I especially like the train part!\n"
        "Rob: Hahaha! No one talks to the machine like that!\nEric: Is this his only stand-up?\n"
        "Rob: Idk. I'll check.\nEric: Sure.\nRob: Turns out no! There are some of his stand-ups on "
        "youtube.\nEric: Gr8! I'll watch them now!\nRob: Me too!\nEric: MACHINE!\nRob: MACHINE!\n"
        "Eric: TTYL?\nRob: Sure :)\nSummary:",
        ["Eric and Rob are going to watch a stand-up on youtube."],
        " Eric and Rob are going to watch a stand-up on youtube.")
    assert splits["validation"][0].id == "samsum/validation/13817023"
    items = [i for split in splits.values() for i in split]
    # The normalisation's promises: no "\r", no blank line before "Summary:", targets free of stops.
    assert not any("\r" in i.prompt or "\n\n" in i.prompt or "\r" in i.target for i in items)
    assert not any("\n\n" in i.target or i.target != " " + i.target.strip() for i in items)
    assert sum(i.references[0] != i.target[1:] for i in items) == 2716 + 139 + 144  # stripped ones


def test_hellaswag_format_on_upstream_shaped_records(tmp_path):
    records = [
        {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
         "ctx_b": "he", "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain",
         "label": 3, "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
         "source_id": "activitynet~v_-JhWjGDPHMY"},
        {"ind": 30, "activity_label": "Home and Garden",
         "ctx_a": "[header] How to clean a grill [title] Scrape off residue.", "ctx_b": "[step] use a WIRE brush",
         "ctx": "", "split": "val", "split_type": "zeroshot", "label": 0,
         "endings": ["[substeps] Scrub the grates.   Rinse.", " Paint it [title] red. ", "Burn it.", "Sell it."],
         "source_id": "wikihow~1"},
    ]
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    items = data.load_task("hellaswag", "validation", tmp_path)
    assert items[0] == MultipleChoice(
        "hellaswag/validation/0", "Roof shingle removal: A man is sitting on a roof. He",
        records[0]["endings"], 3)
    # " [title]" -> ". ", brackets removed, one pass of "  " -> " " (three spaces leave two),
    # ctx_b.capitalize() lower-cases the rest ("WIRE" -> "wire").
    assert items[1] == MultipleChoice(
        "hellaswag/validation/1", "Home and Garden: How to clean a grill. Scrape off residue. use a wire brush",
        [" Scrub the grates.  Rinse.", "Paint it. red.", "Burn it.", "Sell it."], 0)


# ---------------------------------------------------------------- the hub path, against a fake hub
@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """hf_hub_download answered from tmp_path/<repo>/<revision>/<filename>; records each call."""
    import huggingface_hub

    calls = []

    def download(repo_id, filename, *, repo_type=None, revision=None, **_):
        calls.append((repo_id, filename, repo_type, revision))
        return str(tmp_path / repo_id / revision / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)

    def put(task, split, write):
        copy = data.HUB[task]
        path = tmp_path / copy.repo / copy.revision / copy.files[split]
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    return calls, put


def test_hub_samsum_csv_keeps_newlines_in_quoted_fields(fake_hub):
    calls, put = fake_hub
    put("samsum", "test", lambda p: p.write_text(
        'id,dialogue,summary\n13862856,"Hannah: Hey\r\nAmanda: Lemme check",Hannah needs a number.\n'
        '13729565,"Eric: MACHINE!\nRob: gr8, ""really""",Eric and Rob laugh.\n', encoding="utf-8"))
    items = data.load_task("samsum", "test")
    assert calls == [("knkarthick/samsum", "test.csv", "dataset", data.HUB["samsum"].revision)]
    assert items == [
        Generation("samsum/test/13862856", "Dialogue: Hannah: Hey\nAmanda: Lemme check\nSummary:",
                   ["Hannah needs a number."], " Hannah needs a number."),
        Generation("samsum/test/13729565", 'Dialogue: Eric: MACHINE!\nRob: gr8, "really"\nSummary:',
                   ["Eric and Rob laugh."], " Eric and Rob laugh.")]


def test_hub_parquet_copies_equal_local_reading(fake_hub, tmp_path, data_dir):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    calls, put = fake_hub
    gsm = [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]]
    put("gsm8k", "test", lambda p: pq.write_table(pa.Table.from_pylist(gsm), p))
    piqa = [json.loads(line) for line in (data_dir / "piqa" / "valid.jsonl").read_text().splitlines()[:3]]
    put("piqa", "validation", lambda p: pq.write_table(
        pa.Table.from_pylist([dict(r, label=g) for r, g in zip(piqa, (0, 1, 1))]), p))
    hs = {"activity_label": "Roof shingle removal", "ctx_a": "A man is on a roof.", "ctx_b": "he",
          "endings": ["a", "b", "c", "d"], "label": "2"}  # the hub's parquet label is a string
    put("hellaswag", "validation", lambda p: pq.write_table(pa.Table.from_pylist([hs]), p))

    assert data.load_task("gsm8k", "test") == data.load_task("gsm8k", "test", data_dir)[:3]
    assert data.load_task("piqa", "validation") == data.load_task("piqa", "validation", data_dir)[:3]
    assert data.load_task("hellaswag", "validation") == [MultipleChoice(
        "hellaswag/validation/0", "Roof shingle removal: A man is on a roof. He", ["a", "b", "c", "d"], 2)]
    assert calls == [
        ("openai/gsm8k", "main/test-00000-of-00001.parquet", "dataset", "cc7b047b6e5bb11b4f1af84efc572db110a51b3c"),
        ("ybisk/piqa", "plain_text/validation/0000.parquet", "dataset", "142c51238b3ca2bc61e9a075913871b8b600e8e1"),
        ("Rowan/hellaswag", "data/validation-00000-of-00001.parquet", "dataset",
         "218ec52e09a7e7462a5400043bb9a69a41d06b76")]


def test_hub_without_pyarrow_says_how_to_fix(fake_hub, monkeypatch):
    _, put = fake_hub
    put("gsm8k", "train", lambda p: p.write_bytes(b"PAR1"))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow.parquet` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"pip install pyarrow, or pass --data-dir"):
        data.load_task("gsm8k", "train")


def test_hub_download_failure_points_to_data_dir(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(OSError, match=r"openai/gsm8k.*no network.*--data-dir"):
        data.load_task("gsm8k", "test")


# ---------------------------------------------------------------- errors a user can cause
def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


PIQA_LINE = '{"goal": "g", "sol1": "a", "sol2": "b"}\n'


@pytest.mark.parametrize("jsonl, labels, error, message", [
    (None, None, FileNotFoundError, r"(?s)piqa/valid\.jsonl not found.*piqa/valid-labels\.lst"),
    (PIQA_LINE, None, FileNotFoundError, r"valid-labels\.lst not found"),
    (PIQA_LINE * 2 + "{oops\n", "0\n1\n0\n", ValueError, r"valid\.jsonl:3: not valid JSON"),
    (PIQA_LINE + '["a"]\n', "0\n1\n", ValueError, r"valid\.jsonl:2: expected a JSON object"),
    (PIQA_LINE + '{"sol1": "a", "sol2": "b"}\n', "0\n1\n", ValueError, r"valid\.jsonl:2: field 'goal' missing"),
    (PIQA_LINE + '{"goal": 3, "sol1": "a", "sol2": "b"}\n', "0\n1\n", ValueError,
     r"valid\.jsonl:2: field 'goal' should be str, got int"),
    (PIQA_LINE * 2, "0\n", ValueError, r"valid-labels\.lst has 1 labels but .*valid\.jsonl has 2 records"),
    (PIQA_LINE * 2, "0\n2\n", ValueError, r"valid-labels\.lst:2: label '2' is not 0 or 1"),
    ("\n", "", ValueError, r"'piqa' split 'validation' is empty"),
])
def test_piqa_file_errors_name_the_file_and_line(tmp_path, jsonl, labels, error, message):
    if jsonl is not None:
        write(tmp_path / "piqa" / "valid.jsonl", jsonl)
    if labels is not None:
        write(tmp_path / "piqa" / "valid-labels.lst", labels)
    with pytest.raises(error, match=message):
        data.load_task("piqa", "validation", tmp_path)


def test_other_errors(tmp_path):
    good = {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["1", "2", "3", "4"]}
    write(tmp_path / "hellaswag" / "hellaswag_val.jsonl",
          json.dumps(dict(good, label=1)) + "\n" + json.dumps(dict(good, label="")) + "\n")
    with pytest.raises(ValueError, match=r"hellaswag_val\.jsonl:2: field 'label' should be an int in 0\.\.3"):
        data.load_task("hellaswag", "validation", tmp_path)
    write(tmp_path / "hellaswag" / "hellaswag_val.jsonl", json.dumps(dict(good, endings=["1"], label=0)))
    with pytest.raises(ValueError, match=r"hellaswag_val\.jsonl:1: field 'endings' should be a list of 4"):
        data.load_task("hellaswag", "validation", tmp_path)
    write(tmp_path / "samsum" / "test.json", '[{"id": "1", "dialogue": "A: hi"}]')
    with pytest.raises(ValueError, match=r"test\.json record 0: field 'summary' missing"):
        data.load_task("samsum", "test", tmp_path)
    write(tmp_path / "samsum" / "test.json", '{"id": "1"}')
    with pytest.raises(ValueError, match=r"test\.json: expected a JSON array"):
        data.load_task("samsum", "test", tmp_path)
    with pytest.raises(ValueError, match=r"piqa's test labels are hidden.*'validation'"):
        data.load_task("piqa", "test", tmp_path)
    with pytest.raises(ValueError, match=r"gsm8k has no split 'validation'; choose one of \['test', 'train'\]"):
        data.load_task("gsm8k", "validation", tmp_path)
    with pytest.raises(ValueError, match=r"unknown task 'mmlu'"):
        data.load_task("mmlu", "test", tmp_path)
    with pytest.raises(ValueError, match=r"'gsm8k' is generation but got a MultipleChoice"):
        data.training_pair("gsm8k", MultipleChoice("x", "c", ["a"], 0))


# ---------------------------------------------------------------- registry, task specs
def test_task_specs_and_register(monkeypatch):
    builtin = ("piqa", "hellaswag", "gsm8k", "samsum")  # toy.py adds its own tasks when imported
    assert {n: (t.kind, t.eval_split, t.metric) for n, t in data.TASKS.items() if n in builtin} == {
        "piqa": ("multiple_choice", "validation", "acc"), "hellaswag": ("multiple_choice", "validation", "acc"),
        "gsm8k": ("generation", "test", "exact_match"), "samsum": ("generation", "test", "rouge1")}
    gsm, sam = data.TASKS["gsm8k"], data.TASKS["samsum"]
    assert (gsm.max_new_tokens, gsm.stop, gsm.no_repeat_ngram_size) == (256, ("Question:", "</s>", "<|im_end|>"), 0)
    assert (sam.max_new_tokens, sam.stop, sam.no_repeat_ngram_size) == (128, ("Dialogue:", "Summary:", "</s>", "\n\n"), 2)

    monkeypatch.setattr(data, "TASKS", dict(data.TASKS))
    toy_items = [Generation("toy/train/0", "1+1=", ["2"], " 2")]
    toy = data.Task("toy", "generation", "test", lambda split, data_dir: toy_items, max_new_tokens=4)
    data.register_task(toy)
    data.register_task(toy)  # the same spec again is fine
    assert data.load_task("toy", "train") == toy_items
    with pytest.raises(ValueError, match="a different task named 'toy'"):
        data.register_task(data.Task("toy", "generation", "test", lambda s, d: []))
    data.register_task(data.Task("void", "generation", "test", lambda s, d: []))
    with pytest.raises(ValueError, match="'void' split 'train' is empty"):
        data.load_task("void", "train")


# ---------------------------------------------------------------- few-shot, split
def test_fewshot_prefix_is_the_harness_draw(data_dir):
    train = data.load_task("gsm8k", "train", data_dir)
    test = data.load_task("gsm8k", "test", data_dir)[:2]
    rng = random.Random(1234)  # the harness: one generator, seed 1234, rng.sample(train_docs, k) per doc
    draws = [rng.sample(range(len(train)), 5) for _ in test]
    raw = [json.loads(line) for line in (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()]
    expected = ["".join("Question: " + raw[i]["question"] + "\nAnswer: " + raw[i]["answer"] + "\n\n" for i in d)
                for d in draws]
    assert data.fewshot_prefix("gsm8k", train, 5) == expected[0]
    shot = data.add_fewshot("gsm8k", test, train, 5)
    assert [s.prompt for s in shot] == [e + t.prompt for e, t in zip(expected, test)]
    assert [s.target for s in shot] == [t.target for t in test]
    assert data.add_fewshot("gsm8k", test, train, 0) == test


def test_fewshot_prefix_multiple_choice():
    shots = [MultipleChoice(f"m/{i}", f"Q{i}:", ["no", "yes"], i % 2) for i in range(4)]
    order = random.Random(7).sample(range(4), 3)
    assert data.fewshot_prefix("piqa", shots, 3, 7) == "".join(
        f"Q{i}: {['no', 'yes'][i % 2]}\n\n" for i in order)
    with pytest.raises(ValueError, match="cannot draw 5 shots from 4"):
        data.fewshot_prefix("piqa", shots, 5)


def test_split_train_val():
    items = list(range(10))
    train, val = data.split_train_val(items, seed=0)
    assert (len(train), len(val)) == (8, 2)
    assert sorted(train + val) == items and train == sorted(train)
    assert data.split_train_val(items, seed=0) == (train, val)
    assert data.split_train_val(items, seed=1) != (train, val)
    assert [len(p) for p in data.split_train_val(list(range(16113)))] == [12890, 3223]
    with pytest.raises(ValueError, match="frac"):
        data.split_train_val(items, frac=1.0)


# ---------------------------------------------------------------- tokenisation and batches
def test_encode_pair_full_loss_and_masked_context():
    tok = ByteTokenizer()
    ids, labels = data.encode_pair(tok, "Q: 1+1\nA:", " 2", max_len=64)
    assert ids == [1] + byte_ids("Q: 1+1\nA: 2") + [2]
    assert labels == ids  # the paper's default: loss on every token, labels are the ids themselves
    ids, labels = data.encode_pair(tok, "Q: 1+1\nA:", " 2", max_len=64, mask_context=True)
    assert labels == [-100] * 10 + byte_ids(" 2") + [2]  # BOS and the 9 bytes of the context


def test_encode_pair_truncates_the_context_from_the_left():
    tok = ByteTokenizer()
    ids, labels = data.encode_pair(tok, "abcdefgh", " xy", 8, mask_context=True)
    assert ids == [1] + byte_ids("fgh xy") + [2]  # BOS kept, "abcde" dropped, target + EOS whole
    assert labels == [-100] * 4 + byte_ids(" xy") + [2]
    examples, n = data.encode_pairs(tok, [("abcdefgh", " xy"), ("a", " b")], 8)
    assert n == 1 and examples[1] == ([1] + byte_ids("a b") + [2],) * 2
    ids, _ = data.encode_pair(tok, "ab", " a long target", 6)  # target longer than max_len: its end
    assert ids == [1] + byte_ids("rget") + [2]
    ids, _ = data.encode_pair(ByteTokenizer(add_bos=False), "abcdefgh", " xy", 8)
    assert ids == byte_ids("efgh xy") + [2]


def test_collate_right_pads():
    batch = data.collate([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_batches_cover_every_example_once_and_bucket_lengths():
    rng = random.Random(0)
    examples = [([7] * rng.randint(1, 200), []) for _ in range(1000)]
    got = data.batches(examples, 8, shuffle=True, seed=3)
    assert sorted(id(e) for b in got for e in b) == sorted(id(e) for e in examples)
    assert len(got) == 125 and all(len(b) == 8 for b in got)
    assert [[id(e) for e in b] for b in data.batches(examples, 8, shuffle=True, seed=3)] == \
        [[id(e) for e in b] for b in got]
    plain = data.batches(examples, 8, shuffle=False)
    assert [e for b in plain for e in b] == examples
    # Uniform lengths 1..200: random batches of 8 are ~40% padding, bucketing brings it under 3%.
    assert data.padding_waste(plain) > 0.35 and data.padding_waste(got) < 0.03
    assert data.padding_waste([[([1, 2, 3], []), ([1], [])]]) == pytest.approx(2 / 6)


def test_toy_tasks_are_known_once_an_entry_point_is_imported():
    """`--task toy-mc` works in a fresh process: train.py and eval.py import toy.py, which registers
    its tasks; data alone knows only the paper's."""
    code = ("import data; before = data.task_names(); import eval; "
            "print('toy-mc' in before, data.get_task('toy-mc').kind, 'toy-gen' in data.task_names())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "multiple_choice", "True"]
