"""Evaluation: log-likelihood multiple choice, greedy generation, per-instance prediction records.

MUSCLE's metrics (the paper, Sec. 3: negative flips, BTC, gain/regression rates) compare two models
instance by instance, so evaluation writes one JSON line per instance; `python eval.py compare`
turns two or three such files into the compatibility report (compare.py).

The paper evaluated with lm-evaluation-harness v0.4.3 (the paper, appendix A.3); the
scoring here reproduces its rules:
- multiple choice: one request (context, " " + choice) per choice, tokenised as the harness's
  `_encode_pair`, scored by the sum of the continuation's log-probabilities; acc = argmax, acc_norm =
  argmax of ll / len(choice in characters). No BOS by default (v0.4.3's causal-LM default, what the
  paper used); `add_bos=True` (CLI `--add-bos`) prepends it as harness >= v0.4.10 does for Llama.
- generation: greedy, left-padded batches, prompt left-truncated to max_length - max_new_tokens, stop
  at EOS or a stop string, text cut at the first stop string, `no_repeat_ngram_size` as transformers.
  The BOS choice applies to prompts too (v0.4.3 encodes them with the same setting).
- GSM8K `correct` is strict-match ("#### N", the paper's "exact match of the final number");
  flexible-extract is stored beside it (`correct_flexible`) and printed too.
Precision: log-softmax in float32 and sums in float64 whatever the model's dtype (the harness
takes log-softmax in the model's dtype), so a bfloat16 model's scores lose nothing more here.

Speed: the default multiple-choice path runs each item's shared prefix (normally the context) once
into a KV cache, copies the cache to the item's choices, runs the choices' remaining tokens in
small batches of similar length, and projects only the scored positions to the vocabulary; the
plain path (one forward per choice) is kept as the reference it must equal. Generation projects
only the last position. (bench/RESULTS.md measures both against lm-eval and transformers.)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tqdm import tqdm

import cli
import data
import files
import lora
import metrics
import models
import toy  # noqa: F401  (registers the toy tasks and the toy bases)


# ------------------------------------------------------------------ log-likelihood requests
@dataclass
class Request:
    """One (context, continuation) pair tokenised as the harness does.

    `tokens` is the model input: (context tokens + continuation tokens) left-truncated to
    max_length + 1, last token dropped; its last len(targets) positions predict `targets`.
    """

    tokens: list[int]
    targets: list[int]
    truncated: bool = False  # the context lost tokens on the left to fit max_length

    @property
    def start(self) -> int:
        """First input position whose logits are scored."""
        return len(self.tokens) - len(self.targets)


def encode_request(tokenizer: Any, context: str, continuation: str, add_bos: bool = False,
                   max_length: int = 2048) -> Request:
    """Tokenise like harness v0.4.3 `_encode_pair` + `_loglikelihood_tokens`.

    Trailing spaces of the context move to the continuation; the continuation's tokens are those
    of encode(context + continuation) after len(encode(context)), so a token that merges across the
    boundary counts as continuation.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if context:
        context_ids = tokenizer.encode(context, add_bos=add_bos)
        targets = tokenizer.encode(context + continuation, add_bos=add_bos)[len(context_ids):]
    else:  # the harness scores an empty context after the BOS (else EOS) token
        context_ids = [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id]
        targets = tokenizer.encode(continuation, add_bos=False)
    if not 0 < len(targets) <= max_length:
        raise ValueError(f"continuation {cli.short(continuation)} after context {cli.short(context)} encodes "
                         f"to {len(targets)} tokens; scoring needs 1 to max_length={max_length}")
    whole = context_ids + targets
    return Request(whole[-(max_length + 1):][:-1], targets, truncated=len(whole) > max_length + 1)


def note_truncated(n: int, total: int, what: str, limit: int) -> None:
    """Say how many inputs were cut on the left to fit the model: a long input is truncated as
    the harness does, never a crash, and never silently."""
    if n:
        print(f"note: {n} of {total} {what} did not fit in {limit} tokens and lost the start of "
              f"their context", file=sys.stderr)


def _token_scores(logits: torch.Tensor, targets: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: log p(target) in float64 (float32 sums round at ~1e-4) and whether the
    target is the argmax, from the logits [N, V] that predict the N targets."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(targets, device=logits.device)
    return logprobs.gather(-1, target[:, None]).squeeze(-1).double(), logprobs.argmax(-1) == target


def _continuation_score(logits: torch.Tensor, targets: Sequence[int]) -> tuple[float, bool]:
    """(sum of log p(target), every target is the argmax) from the logits that predict the targets."""
    picked, greedy = _token_scores(logits, targets)
    return picked.sum().item(), bool(greedy.all())


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_right(rows: Sequence[Sequence[int]], width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (pad 0: masked anyway) and the matching 0/1 attention mask."""
    ids = torch.tensor([list(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    return ids, mask


def _score_plain(model: torch.nn.Module, request: Request) -> tuple[float, bool]:
    """The reference path: one forward of one request, as the harness does with batch size 1."""
    ids = torch.tensor([request.tokens], device=_device(model))
    return _continuation_score(model(ids)[0, request.start:], request.targets)


# ------------------------------------------------------------------ fast path: shared prefixes
def _common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows[1:]):
            return i
    return n


def _shared_prefix_len(requests: Sequence[Request]) -> int:
    """Tokens all of an item's choices share and that run once; every choice keeps >= 1 own token.

    The longest common prefix of the token inputs, not the context's length: tokenisation can merge
    the context's last characters with the continuation, and choices often share their first words.
    """
    rows = [r.tokens for r in requests]
    return min(_common_prefix_len(rows), min(len(r) for r in rows) - 1)


def _expand_cache(model: torch.nn.Module, cache: Any, index: torch.Tensor, max_len: int) -> Any:
    """A new cache whose row i holds the stored positions of `cache` row index[i], room for max_len."""
    expanded = model.new_cache(len(index), max_len)
    for dst, src in zip(expanded.keys + expanded.values, cache.keys + cache.values):
        dst[:, :, :cache.length] = src[index, :, :cache.length]
    expanded.length = cache.length
    return expanded


# Choice rows per suffix forward. Rows are sorted by suffix length first, so a small group pads
# little, and a few rows at a time beat one batch padded to the longest (bench/scoring.py).
SUFFIX_ROWS = 8


def _suffix_hidden(model: torch.nn.Module, cache: Any, prefix_mask: torch.Tensor, prefix_lens: Sequence[int],
                   rows: Sequence[tuple[int, Request]]) -> torch.Tensor:
    """Final hidden states [len(rows), width, H] of the rows' tokens after their item's prefix,
    run in one right-padded batch on copies of the prefix cache. The rows' attention mask covers
    the prefixes' padding with zeros, so positions (cumsum of the mask) and attention equal each
    request run alone."""
    device = prefix_mask.device
    width = max(len(r.tokens) - prefix_lens[j] for j, r in rows)
    index = torch.tensor([j for j, _ in rows], device=device)
    choice_cache = _expand_cache(model, cache, index, cache.length + width)
    ids, mask = _pad_right([r.tokens[prefix_lens[j]:] for j, r in rows], width, device)
    return model.hidden_states(ids, torch.cat([prefix_mask[index], mask], dim=1), choice_cache)


def _packed_scores(model: torch.nn.Module, hidden: Sequence[torch.Tensor],
                   targets: Sequence[Sequence[int]]) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) per row from the hidden states of its scored positions only:
    one lm_head and one log-softmax over all rows' scored positions packed together, so padding
    and unscored positions never get full-vocabulary logits."""
    picked, greedy = _token_scores(model.lm_head(torch.cat(list(hidden))), [t for ts in targets for t in ts])
    sizes = [len(ts) for ts in targets]
    return [(p.sum().item(), bool(g.all())) for p, g in zip(picked.split(sizes), greedy.split(sizes))]


def _score_items_fast(model: torch.nn.Module, items: Sequence[Sequence[Request]],
                      suffix_rows: int = SUFFIX_ROWS) -> list[list[tuple[float, bool]]]:
    """Score several items' choices: the items' shared prefixes once, in one batch into a KV
    cache; then the choice rows, sorted by suffix length, `suffix_rows` at a time on copies of
    that cache; then the scored positions of all rows through lm_head together.

    A row's scored positions may start inside the prefix (the prefix's last position, at least,
    predicts the first continuation token): those come from the prefix's hidden states.
    """
    device = _device(model)
    prefix_lens = [_shared_prefix_len(reqs) for reqs in items]
    rows = [(j, r) for j, reqs in enumerate(items) for r in reqs]
    width = max(prefix_lens)
    prefix_ids, prefix_mask = _pad_right([reqs[0].tokens[:p] for reqs, p in zip(items, prefix_lens)], width, device)
    cache = model.new_cache(len(items), width)
    prefix_hidden = model.hidden_states(prefix_ids, prefix_mask, cache) if width else None
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][1].tokens) - prefix_lens[rows[i][0]])
    scored: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    for s in range(0, len(order), suffix_rows):
        group = order[s:s + suffix_rows]
        hidden = _suffix_hidden(model, cache, prefix_mask, prefix_lens, [rows[i] for i in group])
        for row, i in enumerate(group):
            (j, r), p = rows[i], prefix_lens[rows[i][0]]
            own = hidden[row, max(r.start - p, 0):len(r.tokens) - p]
            scored[i] = torch.cat([prefix_hidden[j, r.start:p], own]) if r.start < p else own
    flat = _packed_scores(model, scored, [r.targets for _, r in rows])
    scores: list[list[tuple[float, bool]]] = [[] for _ in items]
    for (j, _), score in zip(rows, flat):
        scores[j].append(score)
    return scores


def _batches_by_rows(order: Sequence[int], sizes: Sequence[int], max_rows: int) -> Iterable[list[int]]:
    """Consecutive groups of `order` whose sizes sum to at most max_rows (at least one per group)."""
    group: list[int] = []
    rows = 0
    for i in order:
        if group and rows + sizes[i] > max_rows:
            yield group
            group, rows = [], 0
        group.append(i)
        rows += sizes[i]
    if group:
        yield group


# ------------------------------------------------------------------ multiple choice
@torch.inference_mode()
def score_requests(model: torch.nn.Module, requests: Sequence[Sequence[Request]], batch_size: int = 32,
                   fast: bool = True, progress: bool = False) -> list[list[tuple[float, bool]]]:
    """(log-likelihood, is_greedy) per request of each item; `batch_size` counts choice rows.

    Items are sorted longest first (as the harness does, so memory errors come early) and packed
    into batches of at most `batch_size` choices.
    """
    if not fast:
        return [[_score_plain(model, r) for r in reqs] for reqs in tqdm(requests, disable=not progress)]
    lengths = [max(len(r.tokens) for r in reqs) for reqs in requests]
    order = sorted(range(len(requests)), key=lambda i: -lengths[i])
    results: list[list[tuple[float, bool]]] = [[] for _ in requests]
    groups = list(_batches_by_rows(order, [len(reqs) for reqs in requests], batch_size))
    for group in tqdm(groups, desc="scoring", disable=not progress):
        for i, scores in zip(group, _score_items_fast(model, [requests[i] for i in group])):
            results[i] = scores
    return results


def _argmax(values: Sequence[float]) -> int:
    """First index of the maximum (numpy's argmax, as the harness uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choice_record(item: Any, scores: Sequence[tuple[float, bool]]) -> dict[str, Any]:
    """Prediction record of one multiple-choice item (harness acc and acc_norm)."""
    lls = [ll for ll, _ in scores]
    pred = _argmax(lls)
    pred_norm = _argmax([ll / len(c) for ll, c in zip(lls, item.choices)])
    return {
        "prediction": pred, "correct": pred == item.gold, "score": float(pred == item.gold),
        "gold": item.gold, "loglikelihoods": lls, "is_greedy": [g for _, g in scores],
        "acc_norm_prediction": pred_norm, "correct_norm": pred_norm == item.gold,
    }


def encode_requests(tokenizer: Any, items: Sequence[Any], add_bos: bool = False,
                    max_length: int = 2048) -> list[list[Request]]:
    """The requests of every choice of every multiple-choice item; an item that cannot be
    scored (a choice of no tokens, a continuation longer than the model) is named by its id."""
    requests = []
    for it in items:
        try:
            requests.append([encode_request(tokenizer, it.context, " " + c, add_bos, max_length)
                             for c in it.choices])
        except ValueError as e:
            raise ValueError(f"item {it.id} cannot be scored: {e}") from None
    return requests


def score_choices(model: torch.nn.Module, tokenizer: Any, items: Sequence[Any], batch_size: int = 32,
                  add_bos: bool = False, fast: bool = True, max_length: int | None = None,
                  progress: bool = False) -> list[dict[str, Any]]:
    """Score `data.MultipleChoice` items; one record per item (see `choice_record`).

    max_length defaults to the model's max_position_embeddings (the harness's max_length).
    """
    max_length = max_length or model.config.max_position_embeddings
    requests = encode_requests(tokenizer, items, add_bos, max_length)
    note_truncated(sum(any(r.truncated for r in reqs) for reqs in requests), len(items), "items", max_length)
    scores = score_requests(model, requests, batch_size, fast, progress)
    return [{"id": it.id, **choice_record(it, s)} for it, s in zip(items, scores)]


class NonFinite(ValueError):
    """The model's outputs hold NaN or inf: its weights (base or adapter) are broken, and no
    accuracy computed from them would mean anything."""


def _first_bad(values: torch.Tensor) -> str:
    bad = values[~torch.isfinite(values)]
    return str(bad[0].item()) if len(bad) else "finite"


def check_finite(records: Sequence[dict[str, Any]]) -> None:
    """Raise NonFinite naming the first record whose log-likelihoods are NaN or infinite."""
    for r in records:
        values = r.get("loglikelihoods") or []
        if not all(math.isfinite(v) for v in values):
            raise NonFinite(f"non-finite log-likelihoods {values} on item {r['id']}")


# ------------------------------------------------------------------ greedy generation
class NGramBlocker:
    """transformers' NoRepeatNGramLogitsProcessor for one sequence, kept up to date token by token.

    Over the whole sequence (prompt included, padding excluded), every token that followed the
    current last n-1 tokens anywhere before is banned. Padding is excluded so a sequence generates
    the same text in any batch; transformers counts left pads too, which only matters if the model
    generates the pad token without it being EOS.
    """

    def __init__(self, n: int, tokens: Sequence[int]):
        self.n = n
        self.tokens: list[int] = []
        self.followers: dict[tuple[int, ...], set[int]] = {}
        for t in tokens:
            self.append(t)

    def append(self, token: int) -> None:
        self.tokens.append(token)
        if len(self.tokens) >= self.n:
            self.followers.setdefault(tuple(self.tokens[len(self.tokens) - self.n:-1]), set()).add(token)

    def banned(self) -> list[int]:
        if len(self.tokens) + 1 < self.n:
            return []
        return list(self.followers.get(tuple(self.tokens[len(self.tokens) - self.n + 1:]), ()))


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """Text before the earliest occurrence of any stop string (the harness splits on each)."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text


def _pick_next(logits: torch.Tensor, blockers: Sequence[NGramBlocker | None]) -> torch.Tensor:
    """Greedy choice after the n-gram bans; argmax takes the first maximum, as transformers."""
    scores = logits.float()
    if not torch.isfinite(scores).all():  # argmax of NaN would be a silently arbitrary token
        raise NonFinite(f"non-finite logits ({_first_bad(scores)}) while generating")
    for row, blocker in enumerate(blockers):
        if blocker is not None:
            scores[row, blocker.banned()] = float("-inf")
    return scores.argmax(-1)


def _last_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
    """Logits [B, V] of the last position only: at prefill the other positions' full-vocabulary
    projections would be computed and dropped (transformers' `logits_to_keep=1`)."""
    return model.lm_head(model.hidden_states(ids, mask, cache)[:, -1])


def _generate_batch(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    stop: Sequence[str], no_repeat_ngram_size: int) -> list[list[int]]:
    """Greedy decoding of one left-padded batch with the KV cache; new tokens per row, EOS excluded.

    A row stops at EOS or once its decoded continuation contains a stop string; the batch stops
    when every row has (finished rows keep feeding the pad token, their output ignored).
    """
    device = _device(model)
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_id
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    blockers = [NGramBlocker(no_repeat_ngram_size, p) if no_repeat_ngram_size else None for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    cache = model.new_cache(len(prompts), width + max_new_tokens)
    logits = _last_logits(model, ids, mask, cache)
    for step in range(max_new_tokens):
        next_ids = _pick_next(logits, [None if d else b for d, b in zip(done, blockers)])
        for row, token in enumerate(next_ids.tolist()):
            if done[row]:
                next_ids[row] = pad
            elif token == tokenizer.eos_id:
                done[row] = True
            else:
                new[row].append(token)
                if blockers[row] is not None:
                    blockers[row].append(token)
                if stop:  # decode once per token, not once per stop string
                    text = tokenizer.decode(new[row])
                    done[row] = any(s in text for s in stop)
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        logits = _last_logits(model, next_ids[:, None], mask, cache)
    return new


@torch.inference_mode()
def generate_ids(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 stop: Sequence[str] = (), no_repeat_ngram_size: int = 0, batch_size: int = 32,
                 progress: bool = False) -> list[list[int]]:
    """Greedy continuations (token ids, EOS excluded) of tokenised prompts, longest prompts batched first."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for group in tqdm(groups, desc="generating", disable=not progress):
        batch = _generate_batch(model, tokenizer, [prompts[i] for i in group], max_new_tokens, stop,
                                no_repeat_ngram_size)
        for i, tokens in zip(group, batch):
            out[i] = tokens
    return out


def generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
             stop: Sequence[str] = (), no_repeat_ngram_size: int = 0, batch_size: int = 32,
             add_bos: bool = False, max_length: int | None = None, progress: bool = False) -> list[str]:
    """Greedy continuations of text prompts, cut at the first stop string.

    Prompts are left-truncated to max_length - max_new_tokens tokens, as the harness does.
    """
    max_length = max_length or model.config.max_position_embeddings
    budget = max_length - max_new_tokens
    if budget <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt (max_length={max_length})")
    ids = [tokenizer.encode(p, add_bos=add_bos) for p in prompts]
    note_truncated(sum(len(i) > budget for i in ids), len(ids), "prompts", budget)
    ids = [i[-budget:] for i in ids]
    outputs = generate_ids(model, tokenizer, ids, max_new_tokens, stop, no_repeat_ngram_size, batch_size, progress)
    return [cut_at_stop(tokenizer.decode(t), stop) for t in outputs]


# ------------------------------------------------------------------ tasks: records and metrics
def generation_record(metric: str, item: Any, text: str) -> dict[str, Any]:
    """Prediction record of one generated text, scored against any of the item's references.

    GSM8K ("exact_match"): both harness filters are stored; `correct` is strict-match (the
    "#### N" answer the paper scores, appendix A.3, and the format the task adapter is trained to
    write), `correct_flexible` the flexible-extract variant. SAMSum ("rouge1"): score = ROUGE-1 F,
    correct = None (a continuous metric: the report uses gain/regression rates, the paper's Sec. 3).
    """
    record: dict[str, Any] = {"prediction": text, "reference": item.references[0]}
    if metric == "exact_match":
        strict, flexible = metrics.extract_strict(text), metrics.extract_flexible(text)
        correct = any(metrics.exact_match(strict, r) for r in item.references)
        record.update(correct=correct, score=float(correct), extracted_strict=strict,
                      extracted_flexible=flexible,
                      correct_flexible=any(metrics.exact_match(flexible, r) for r in item.references))
    elif metric == "rouge1":
        record.update(correct=None, score=max(metrics.rouge1(text, r) for r in item.references))
    else:
        raise ValueError(f"unknown generation metric {metric!r} (known: exact_match, rouge1)")
    return record


def evaluate(model: torch.nn.Module, tokenizer: Any, task: str | data.Task, items: Sequence[Any],
             batch_size: int = 32, limit: int | None = None, num_fewshot: int = 0, fewshot_items: Sequence[Any] = (),
             add_bos: bool = False, fast: bool = True, max_length: int | None = None,
             progress: bool = False) -> list[dict[str, Any]]:
    """Prediction records (id, task, prediction, correct, score, ..., prompt: the text scored or
    continued, few-shot prefix included) of the first `limit` items.

    num_fewshot > 0 prepends the harness's few-shot prefix drawn from `fewshot_items` (the train
    split); the paper's models are fine-tuned on the task, so 0-shot is the default. batch_size
    counts choice sequences (multiple choice) or prompts (generation) per forward.
    """
    spec = data.get_task(task)
    items = list(items[:limit] if limit is not None else items)
    prompts = data.add_fewshot(spec, items, fewshot_items, num_fewshot)
    if spec.kind == "multiple_choice":
        records = score_choices(model, tokenizer, prompts, batch_size, add_bos, fast, max_length, progress)
        check_finite(records)
    else:
        texts = generate(model, tokenizer, [it.prompt for it in prompts], spec.max_new_tokens, spec.stop,
                         spec.no_repeat_ngram_size, batch_size, add_bos, max_length, progress)
        records = [{"id": it.id, **generation_record(spec.metric, it, t)} for it, t in zip(items, texts)]
    texts_in = [it.context if spec.kind == "multiple_choice" else it.prompt for it in prompts]
    return [{"id": r.pop("id"), "task": spec.name, **r, "prompt": text} for r, text in zip(records, texts_in)]


def check_scorable(task: str | data.Task, items: Sequence[Any], tokenizer: Any, max_length: int,
                   add_bos: bool = False) -> None:
    """Raise the error `evaluate` would raise on these items, without a model: every choice
    tokenises into a request (multiple choice), or the task's new tokens leave room for a prompt."""
    spec = data.get_task(task)
    if spec.kind == "multiple_choice":
        encode_requests(tokenizer, items, add_bos, max_length)
    elif spec.max_new_tokens >= max_length:
        raise ValueError(f"task {spec.name} generates {spec.max_new_tokens} new tokens, which leaves no room "
                         f"for a prompt in the model's context of {max_length} tokens")


def summarize(task: str | data.Task, records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Task metrics: the mean score under the task's metric name (acc, exact_match, rouge1), plus
    acc_norm for multiple choice and the flexible-extract exact match for GSM8K."""
    spec = data.get_task(task)
    n = len(records)
    out = {spec.metric: sum(r["score"] for r in records) / n}
    for key, name in (("correct_norm", "acc_norm"), ("correct_flexible", "exact_match_flexible")):
        if key in records[0]:
            out[name] = sum(r[key] for r in records) / n
    out["n"] = n
    return out


def write_predictions(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """One JSON object per line (UTF-8), in item order, written atomically (an earlier file at
    `path` survives a failed write whole); parent folders are created."""
    return files.write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ------------------------------------------------------------------ command line
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Evaluate a model (+ LoRA adapter) on a task; print the metrics, write one JSON "
                    "line per instance. `python eval.py compare OLD NEW [COMPAT]` prints the "
                    "compatibility report instead (see `python eval.py compare --help`), `python eval.py "
                    "summary RUN_DIR...` the table of several updates (`python eval.py summary --help`).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="registry name, local HF checkpoint dir or hub repo id")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format) to put on the model")
    p.add_argument("--task", required=True, help=f"one of {data.task_names()}")
    p.add_argument("--data-dir", default=None, help="local task files (None: download the pinned hub copy)")
    p.add_argument("--split", default=None, help="split to evaluate (None: the task's evaluation split)")
    p.add_argument("--limit", type=cli.LIMIT, default=None, help="evaluate only the first N items")
    p.add_argument("--batch-size", type=cli.POSITIVE_INT, default=32,
                   help="choice sequences (multiple choice) or prompts (generation) per forward")
    p.add_argument("--num-fewshot", type=cli.NON_NEGATIVE_INT, default=0,
                   help="harness few-shot examples from the train split (seed 1234)")
    p.add_argument("--add-bos", action="store_true",
                   help="prepend BOS to every request (harness >= v0.4.10); off = harness v0.4.3, as the paper")
    p.add_argument("--plain", action="store_true",
                   help="score each choice with its own forward (slow reference path, same numbers)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", type=cli.device, default=None, help="None: cuda if available, else cpu")
    p.add_argument("--out", default="predictions.jsonl", help="predictions file (JSON Lines)")
    return p.parse_args(argv)


# Errors a user can cause (wrong name, path, file, shape, data; no network, gated repo): one line
# naming the input and the fix, exit status 2, no traceback.
USER_ERRORS = (ValueError, OSError, ImportError)


def _same_model(a: str, b: str) -> bool:
    """Whether two --model spellings name one checkpoint: registry names count as their hub id,
    local directories by their resolved path."""
    def canonical(name: str) -> str:
        path = Path(name).expanduser()
        return str(path.resolve()) if path.is_dir() else models.REGISTRY.get(name, name)
    return canonical(a) == canonical(b)


def warn_if_other_base(adapter: str, model_name: str) -> None:
    """Llama-1 and Llama-2 (or Phi-1.5 and Phi-2) have the same shapes, so an adapter of one loads
    onto the other without error; the base_model_name_or_path it was saved with tells them apart."""
    config = json.loads((Path(adapter) / lora.CONFIG_NAME).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if base and not _same_model(base, model_name):
        print(f"warning: adapter {adapter} was trained on {base!r}, not on --model {model_name!r}; "
              f"its predictions on another base mean little", file=sys.stderr)


def name_broken(error: NonFinite, model: str, adapter: str | None) -> str:
    """The NonFinite message with the model and adapter that produced it, and what to check."""
    source = f"--model {model}" + (f" with --adapter {adapter}" if adapter else "")
    return (f"{source}: {error}; its weights hold NaN or inf values, so no accuracy is reported: "
            f"check the checkpoint{' and the adapter' if adapter else ''} (a diverged training run?)")


# train.py's marker of a finished stage, written last into the stage's directory.
STAGE_DONE = "DONE"


def _progress(log: Path) -> tuple[int | None, int | None]:
    """(the best epoch so far, the last step) an unfinished stage's log.jsonl records."""
    records = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a damaged line says nothing about where the stage is
    steps = [r["step"] for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)]
    best = [r.get("best_epoch") for r in records if isinstance(r, dict) and "val_loss" in r]
    return (best[-1] if best else None), (max(steps) if steps else None)


def warn_if_unfinished(adapter: str) -> None:
    """An adapter inside a train.py stage (its directory holds log.jsonl) whose stage has no DONE
    is the best epoch so far of an interrupted stage, not the stage's result. It is evaluated
    (following a long run's progress is a use of it), under a warning that names the stage
    directory, the step its log ends at and the adapter's epoch."""
    stage = Path(adapter).resolve().parent
    if (stage / "log.jsonl").is_file() and not (stage / STAGE_DONE).is_file():
        epoch, step = _progress(stage / "log.jsonl")
        cli.say(f"warning: adapter {adapter} is from an unfinished training stage ({stage} has no "
                f"{STAGE_DONE}{f'; its log ends at step {step}' if step is not None else ''}): it is the "
                f"best epoch so far{f' (epoch {epoch})' if epoch is not None else ''}, not the stage's "
                f"result; rerun train.py to finish the stage")


def run(args: argparse.Namespace) -> None:
    """Evaluate --model (+ --adapter) on --task; write the records, print the metrics."""
    spec = data.get_task(args.task)
    files.check_writable(args.out, "--out")  # before the work whose result it keeps
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    auto = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = models.load_model(args.model, dtype=DTYPES.get(args.dtype, auto), device=device)
    if args.adapter:
        lora.load_adapter(model, args.adapter)
        warn_if_other_base(args.adapter, args.model)
        warn_if_unfinished(args.adapter)
    tokenizer = models.load_tokenizer(args.model)
    items = data.load_task(spec, args.split or spec.eval_split, args.data_dir)
    shots = data.load_task(spec, "train", args.data_dir) if args.num_fewshot else ()
    try:
        records = evaluate(model, tokenizer, spec.name, items, args.batch_size, args.limit, args.num_fewshot,
                           shots, args.add_bos, not args.plain, progress=True)
    except NonFinite as e:
        raise NonFinite(name_broken(e, args.model, args.adapter)) from None
    try:
        path = write_predictions(records, args.out)
    except OSError as e:
        raise OSError(e.errno, f"cannot write --out {args.out} ({e.strerror or e}); an earlier file "
                               f"there is intact: {files.fix_for(e.errno)} or pass another --out, then "
                               f"rerun") from e
    print(json.dumps({"task": spec.name, **summarize(spec.name, records)}))
    print(f"wrote {len(records)} predictions to {path}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        import compare  # the report needs no torch model; imported only for the subcommand

        try:
            return compare.main(argv[1:])
        except KeyboardInterrupt:
            return cli.interrupted("no report was written")
    if argv[:1] == ["summary"]:
        import summary

        return summary.main(argv[1:])
    args = parse_args(argv)
    try:
        run(args)
    except USER_ERRORS as e:
        return cli.fail(e)
    except KeyboardInterrupt:
        return cli.interrupted(f"nothing was written to --out {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
