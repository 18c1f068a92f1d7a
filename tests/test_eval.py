"""eval.py against transformers on tiny random Llama checkpoints with small trained BPE tokenizers.

Oracles: a straightforward transformers computation of the harness's log-likelihood rule (one
full forward per choice), transformers' `generate` for greedy decoding and its
NoRepeatNGramLogitsProcessor for the n-gram ban.
"""
import copy
import json
from dataclasses import dataclass, replace

import pytest
import torch
import transformers
from conftest import DATA_DIR
from fake_hub import SDPACalls, save_checkpoint, tiny_hf_model
from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, processors, trainers

import data
import eval as ev
import generation
import likelihood
import metrics
import models

CORPUS = [
    "Question: How do you boil water?\nAnswer: Put it in a pot and heat it on the stove.",
    "Question: How do I open a jar that is stuck?\nAnswer: Run the lid under hot water, then twist.",
    "The cat sat on the mat. The dog sat on the hat. A man is running down the road.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "How many clips did Natalia sell altogether? #### 72 dollars, $1,000 and -5.",
    "Dialogue: Amanda: I baked cookies. Do you want some?\nJerry: Sure!\nSummary: Amanda baked cookies.",
]


def build_tokenizer(path, bos: bool, split_words: bool):
    """A byte-level BPE (~330 tokens) saved as tokenizer.json + tokenizer_config.json.

    `bos`: a post-processor adds <s> (Llama's convention), else none (Phi's). `split_words=False`
    lets merges cross spaces, so encode(context + continuation) need not extend encode(context).
    """
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=330, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": bos,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


@dataclass
class Tiny:
    """Our model and tokenizer and transformers' (the oracles), all from one checkpoint dir."""
    model: torch.nn.Module
    tok: object
    hf: transformers.PreTrainedModel
    hf_tok: transformers.PreTrainedTokenizerFast
    has_bos: bool  # the tokenizer adds BOS by default (Llama's convention)
    path: object


@pytest.fixture(scope="module", params=["bos_words", "nobos_merging"])
def setup(request, tmp_path_factory) -> Tiny:
    """A BOS-adding word-splitting tokenizer, and a BOS-less one whose merges cross spaces."""
    bos = request.param == "bos_words"
    path = tmp_path_factory.mktemp(request.param)
    vocab = build_tokenizer(path, bos=bos, split_words=bos)
    hf = tiny_hf_model("llama", vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    save_checkpoint(hf, path)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"),
                                                  bos_token="<s>", eos_token="</s>")
    return Tiny(models.load_model(path), models.load_tokenizer(path), hf, hf_tok, bos, path)


ITEMS = [
    data.MultipleChoice("shared-words", "Question: How do you boil water?\nAnswer:",
                        ["Put it in a pot and heat it.", "Put it in a pot and freeze it.", "Heat"], 0),
    data.MultipleChoice("trailing-space", "The cat sat on the ", ["mat.", "hat.", "road."], 2),
    data.MultipleChoice("long", " ".join(CORPUS[2:5]), ["72", "-5 dollars", "$1,000", "half as many"], 1),
    data.MultipleChoice("one-choice", "Jerry: Sure!\nSummary:", ["Amanda baked cookies."], 0),
]


# ------------------------------------------------------------------ log-likelihood oracle
@torch.no_grad()
def oracle_loglikelihoods(hf, hf_tok, item, add_bos: bool, max_length: int):
    """lm-evaluation-harness v0.4.3's rule, written out on transformers' model and tokenizer."""
    out = []
    context = item.context.rstrip()
    moved = item.context[len(context):]
    for choice in item.choices:
        continuation = moved + " " + choice
        context_ids = hf_tok.encode(context, add_special_tokens=add_bos)
        whole = hf_tok.encode(context + continuation, add_special_tokens=add_bos)
        targets = whole[len(context_ids):]
        inputs = (context_ids + targets)[-(max_length + 1):][:-1]
        logprobs = torch.log_softmax(hf(torch.tensor([inputs])).logits[0, -len(targets):], -1)
        picked = logprobs[torch.arange(len(targets)), targets]
        out.append((picked.sum().item(), bool((logprobs.argmax(-1) == torch.tensor(targets)).all())))
    return out


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("max_length", [2048, 24])  # 24 truncates the long contexts
def test_loglikelihoods_equal_transformers(setup, add_bos, max_length):
    model, tok, hf, hf_tok, tok_has_bos = setup.model, setup.tok, setup.hf, setup.hf_tok, setup.has_bos
    if add_bos and not tok_has_bos:
        pytest.skip("the BOS flag needs a tokenizer with a BOS token")
    records = likelihood.score_choices(model, tok, ITEMS, batch_size=4, add_bos=add_bos, max_length=max_length)
    for item, record in zip(ITEMS, records):
        expected = oracle_loglikelihoods(hf, hf_tok, item, add_bos, max_length)
        assert record["loglikelihoods"] == pytest.approx([ll for ll, _ in expected], abs=1e-4)
        assert record["is_greedy"] == [g for _, g in expected]
        lls = record["loglikelihoods"]
        assert record["prediction"] == lls.index(max(lls))
        norm = [ll / len(c) for ll, c in zip(lls, item.choices)]
        assert record["acc_norm_prediction"] == norm.index(max(norm))
        assert record["correct"] == (record["prediction"] == item.gold) and record["gold"] == item.gold
        assert record["choices"] == item.choices  # the regressions table shows them


def test_bos_flag_changes_the_tokens(setup):
    tok, tok_has_bos = setup.tok, setup.has_bos
    if not tok_has_bos:
        pytest.skip("tokenizer has no BOS")
    without = likelihood.encode_request(tok, "The cat sat on the ", "mat", add_bos=False)
    with_bos = likelihood.encode_request(tok, "The cat sat on the ", "mat", add_bos=True)
    assert with_bos.tokens == [tok.bos_id] + without.tokens and with_bos.targets == without.targets


def test_boundary_merge_moves_tokens_to_the_continuation(setup):
    """With merges across spaces, the continuation starts where encode(context) ends, as the harness."""
    tok, tok_has_bos = setup.tok, setup.has_bos
    if tok_has_bos:
        pytest.skip("the word-splitting tokenizer never merges across the boundary")
    context, continuation = "The cat sat on the", " mat."
    request = likelihood.encode_request(tok, context, continuation)
    context_ids = tok.encode(context, add_bos=False)
    whole = tok.encode(context + continuation, add_bos=False)
    assert whole[:len(context_ids)] != context_ids  # the case this test is about really occurs
    assert request.targets == whole[len(context_ids):]
    assert request.tokens == (context_ids + request.targets)[:-1]


@pytest.fixture(scope="module")
def plain_scores(setup):
    """max_length -> (items, plain-path records); real PIQA items only untruncated (long choices)."""
    model, tok = setup.model, setup.tok
    piqa = data.load_task("piqa", "validation", DATA_DIR)[:6] if DATA_DIR.is_dir() else []
    return {n: (items, likelihood.score_choices(model, tok, items, fast=False, max_length=n))
            for n, items in ((2048, ITEMS + piqa), (24, ITEMS))}


@pytest.mark.parametrize("batch_size,max_length", [(3, 2048), (64, 2048), (64, 24)])
def test_fast_path_equals_plain_path(setup, plain_scores, batch_size, max_length):
    """One item or several per batch, and left truncation that shifts choices apart (no shared prefix)."""
    model, tok = setup.model, setup.tok
    items, plain = plain_scores[max_length]
    fast = likelihood.score_choices(model, tok, items, batch_size=batch_size, max_length=max_length)
    for p, f in zip(plain, fast):
        assert f["loglikelihoods"] == pytest.approx(p["loglikelihoods"], abs=1e-5)
        assert f["is_greedy"] == p["is_greedy"] and f["id"] == p["id"]


@pytest.mark.parametrize("suffix_rows", [1, 5, 100])
def test_sorted_suffix_groups_equal_plain_path(setup, plain_scores, suffix_rows):
    """Rows sorted by suffix length and run in groups of any size on copies of the prefix cache."""
    items, plain = plain_scores[2048]
    requests = [[likelihood.encode_request(setup.tok, it.context, " " + c) for c in it.choices] for it in items]
    with torch.no_grad():
        fast = likelihood._score_items_fast(setup.model, requests, suffix_rows)
    for p, f in zip(plain, fast):
        assert [ll for ll, _ in f] == pytest.approx(p["loglikelihoods"], abs=1e-5)
        assert [g for _, g in f] == p["is_greedy"]


def test_fast_path_runs_its_right_padded_prefixes_without_a_mask(setup, plain_scores, monkeypatch):
    """The items' shared prefixes (one right-padded batch) take SDPA's causal path; the choice rows
    after the cache need the mask (their keys include the prefixes' padding)."""
    items, plain = plain_scores[2048]
    requests = [[likelihood.encode_request(setup.tok, it.context, " " + c) for c in it.choices] for it in items]
    sdpa = SDPACalls(monkeypatch)
    with torch.no_grad():
        fast = likelihood._score_items_fast(setup.model, requests, suffix_rows=100)
    layers = setup.model.config.num_hidden_layers
    assert (sdpa.calls, sdpa.masked) == (2 * layers, layers)  # prefix forward, one suffix group
    for p, f in zip(plain, fast):
        assert [ll for ll, _ in f] == pytest.approx(p["loglikelihoods"], abs=1e-5)


def test_shared_prefix_covers_common_tokens_but_leaves_each_choice_one():
    reqs = [likelihood.Request([5, 6, 7, 8], [8]), likelihood.Request([5, 6, 7, 9, 4], [9, 4]), likelihood.Request([5, 6, 7], [7])]
    assert likelihood._shared_prefix_len(reqs) == 2
    assert likelihood._shared_prefix_len([likelihood.Request([5, 6, 7, 8], [7, 8]), likelihood.Request([5, 6, 9], [9])]) == 2
    assert likelihood._shared_prefix_len([likelihood.Request([1, 2], [2]), likelihood.Request([3, 2], [2])]) == 0


def test_continuation_longer_than_the_model_is_a_clear_error(setup):
    tok = setup.tok
    with pytest.raises(ValueError, match="max_length=4"):
        likelihood.encode_request(tok, "Question:", " Put it in a pot and heat it.", max_length=4)


# ------------------------------------------------------------------ greedy generation
PROMPTS = ["Question: How do you boil water?\nAnswer:", "The cat",
           "Dialogue: Amanda: I baked cookies. Do you want some?\nSummary:"]


@torch.no_grad()
def hf_greedy(hf, prompt_ids, eos: int, max_new_tokens: int, no_repeat_ngram_size: int = 0):
    """transformers' greedy `generate` on the left-padded batch (pad = eos); new tokens before EOS."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                      no_repeat_ngram_size=no_repeat_ngram_size, eos_token_id=eos, pad_token_id=eos)
    rows = out[:, width:].tolist()
    return [row[:row.index(eos)] if eos in row else row for row in rows]


def with_eos(tok, eos: int):
    """The tokenizer with another EOS (and pad) id, so that a random model does emit EOS."""
    other = copy.copy(tok)
    other.eos_id = other.pad_id = eos
    return other


@pytest.mark.parametrize("ngram", [0, 2])
def test_greedy_generation_equals_transformers(setup, ngram):
    model, tok, hf = setup.model, setup.tok, setup.hf
    prompt_ids = [tok.encode(p, add_bos=False) for p in PROMPTS]
    expected = hf_greedy(hf, prompt_ids, tok.eos_id, 20, ngram)
    assert generation.generate_ids(model, tok, prompt_ids, 20, no_repeat_ngram_size=ngram, batch_size=3) == expected
    if ngram:  # the ban really acts: without it the output differs
        assert hf_greedy(hf, prompt_ids, tok.eos_id, 20) != expected
    # A token that some row first generates at position k >= 2, as EOS: that row ends there.
    row, k = next((r, k) for r, out in enumerate(expected) for k in range(2, 20) if out[k] not in out[:k])
    eos = expected[row][k]
    early = hf_greedy(hf, prompt_ids, eos, 20, ngram)
    assert early[row] == expected[row][:k]
    assert generation.generate_ids(model, with_eos(tok, eos), prompt_ids, 20, no_repeat_ngram_size=ngram,
                           batch_size=2) == early


def test_stop_strings_cut_like_truncating_transformers_output(setup):
    model, tok, hf, hf_tok = setup.model, setup.tok, setup.hf, setup.hf_tok
    prompt_ids = [tok.encode(p, add_bos=False) for p in PROMPTS]
    full = [hf_tok.decode(r) for r in hf_greedy(hf, prompt_ids, tok.eos_id, 24, 2)]
    stop = [full[0][4:7], full[1][-3:], "never appears"]
    texts = generation.generate(model, tok, PROMPTS, 24, stop=stop, no_repeat_ngram_size=2, batch_size=3)
    expected = []
    for text in full:
        for s in stop:  # the harness's rule: split on each stop string, keep the first part
            text = text.split(s)[0]
        expected.append(text)
    assert texts == expected and len(texts[0]) <= 4
    # and the first row stopped decoding once its stop string appeared
    ids = generation.generate_ids(model, tok, prompt_ids, 24, stop=stop, no_repeat_ngram_size=2)
    assert stop[0] in tok.decode(ids[0]) and stop[0] not in tok.decode(ids[0][:-1])


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_blocker_equals_transformers_processor(n):
    seq = torch.randint(0, 6, (1, 40), generator=torch.Generator().manual_seed(n))
    processor = transformers.NoRepeatNGramLogitsProcessor(n)
    for length in range(1, 41):
        scores = processor(seq[:, :length], torch.zeros(1, 6))
        expected = sorted(torch.nonzero(scores[0] == float("-inf")).flatten().tolist())
        assert sorted(generation.NGramBlocker(n, seq[0, :length].tolist()).banned()) == expected


def test_cut_at_stop_takes_the_earliest_stop_string():
    assert generation.cut_at_stop("a b\n\nSummary: c", ["Summary:", "\n\n"]) == "a b"
    assert generation.cut_at_stop("no stop here", ["Question:"]) == "no stop here"


# ------------------------------------------------------------------ tasks end to end
def lls(records):
    return [ll for r in records for ll in r["loglikelihoods"]]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_evaluate_piqa_writes_multiple_choice_records(setup, data_dir, tmp_path):
    model, tok = setup.model, setup.tok
    items = data.load_task("piqa", "validation", data_dir)
    records = ev.evaluate(model, tok, "piqa", items, batch_size=4, limit=5)
    written = read_jsonl(ev.write_predictions(records, tmp_path / "sub" / "piqa.jsonl"))
    assert written == records and [r["id"] for r in written] == [it.id for it in items[:5]]
    plain = likelihood.score_choices(model, tok, items[:5], fast=False)
    for record, item, p in zip(written, items, plain):
        assert record["task"] == "piqa" and record["gold"] == item.gold
        assert record["loglikelihoods"] == pytest.approx(p["loglikelihoods"], abs=1e-5)
        assert record["correct"] == (record["prediction"] == item.gold) and record["score"] == float(record["correct"])
    summary = ev.summarize("piqa", written)
    assert summary["n"] == 5 and summary["acc"] == sum(r["correct"] for r in written) / 5


def test_fewshot_prompt_is_the_harness_prefix(setup, data_dir):
    """Two shots from train (seed 1234): the scored context is the prefix + the item's context."""
    model, tok = setup.model, setup.tok
    items = data.load_task("piqa", "validation", data_dir)[:2]
    shots = data.load_task("piqa", "train", data_dir)
    records = ev.evaluate(model, tok, "piqa", items, num_fewshot=2, fewshot_items=shots)
    prompted = data.add_fewshot("piqa", items, shots, 2)
    assert prompted[0].context.endswith("\n\n" + items[0].context) and prompted[0].context != prompted[1].context
    expected = likelihood.score_choices(model, tok, prompted, fast=False)
    assert lls(records) == pytest.approx(lls(expected), abs=1e-5)


def test_evaluate_gsm8k_generates_and_scores(setup, data_dir, tmp_path):
    model, tok = setup.model, setup.tok
    items = data.load_task("gsm8k", "test", data_dir)[:2]
    task = replace(data.TASKS["gsm8k"], max_new_tokens=32)  # the real task but shorter, for speed
    records = ev.evaluate(model, tok, task, items, batch_size=2)
    assert read_jsonl(ev.write_predictions(records, tmp_path / "gsm8k.jsonl")) == records
    texts = generation.generate(model, tok, [it.prompt for it in items], 32, stop=task.stop)
    for record, item, text in zip(records, items, texts):
        assert record["prediction"] == text and record["task"] == "gsm8k"
        assert record["reference"] == item.references[0]
        assert record["correct"] is False and record["extracted_strict"] == "[invalid]"


def test_evaluate_samsum_uses_the_ngram_ban_and_rouge(setup, data_dir):
    model, tok = setup.model, setup.tok
    items = data.load_task("samsum", "test", data_dir)[:2]
    task = replace(data.TASKS["samsum"], max_new_tokens=16)
    records = ev.evaluate(model, tok, task, items)
    texts = generation.generate(model, tok, [it.prompt for it in items], 16, stop=task.stop, no_repeat_ngram_size=2)
    assert texts != generation.generate(model, tok, [it.prompt for it in items], 16, stop=task.stop)
    for record, item, text in zip(records, items, texts):
        assert record["prediction"] == text and record["correct"] is None
        assert record["score"] == metrics.rouge1(text, item.references[0])


def test_gsm8k_record_strict_and_flexible(data_dir):
    item = data.load_task("gsm8k", "test", data_dir)[0]  # answer "... #### 18"
    exact = ev.generation_record("exact_match", item, " " + item.target.strip() + "\n")
    assert exact["correct"] is True and exact["correct_flexible"] is True and exact["extracted_strict"] == "18"
    loose = ev.generation_record("exact_match", item, " She makes $18.")
    assert loose["correct"] is False and loose["correct_flexible"] is True
    assert (loose["extracted_strict"], loose["extracted_flexible"]) == ("[invalid]", "$18.")


def test_samsum_record_scores_rouge1():
    item = data.Generation("s1", "Dialogue: x\nSummary:", ["Amanda baked cookies for Jerry."], "")
    record = ev.generation_record("rouge1", item, "Amanda baked cookies.")
    assert record["correct"] is None
    assert record["score"] == pytest.approx(2 * 1.0 * 0.6 / 1.6)  # P = 3/3, R = 3/5


def test_cli_writes_predictions_and_compare_dispatches(setup, data_dir, tmp_path, capsys):
    out = tmp_path / "piqa.jsonl"
    assert ev.main(["--model", str(setup.path), "--task", "piqa", "--data-dir", str(data_dir), "--limit", "3",
                    "--device", "cpu", "--out", str(out)]) == 0
    records = read_jsonl(out)
    items = data.load_task("piqa", "validation", data_dir)[:3]
    expected = likelihood.score_choices(setup.model, setup.tok, items, fast=False)
    assert lls(records) == pytest.approx(lls(expected), abs=1e-5)
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"task": "piqa", **ev.summarize("piqa", records)}
    assert ev.main(["compare", str(out), str(out), "--out", str(tmp_path / "report")]) == 0
    assert json.loads((tmp_path / "report" / "report.json").read_text())["n"] == 3


def test_phi_fast_scoring_and_generation(tmp_path):
    """The same paths on a tiny Phi (partial RoPE, biases, parallel block): fast == plain, greedy == HF."""
    build_tokenizer(tmp_path, bos=False, split_words=True)
    hf = tiny_hf_model("phi", vocab_size=330, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    model, tok = models.load_model(save_checkpoint(hf, tmp_path)), models.load_tokenizer(tmp_path)
    plain = likelihood.score_choices(model, tok, ITEMS, fast=False)
    assert lls(likelihood.score_choices(model, tok, ITEMS, batch_size=8)) == pytest.approx(lls(plain), abs=1e-5)
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    expected = hf_greedy(hf, prompt_ids, tok.eos_id, 12, 2)
    assert generation.generate_ids(model, tok, prompt_ids, 12, no_repeat_ngram_size=2, batch_size=3) == expected
