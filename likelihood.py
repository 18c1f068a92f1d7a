"""Log-likelihood multiple choice as lm-evaluation-harness v0.4.3 scores it (the paper, appendix A.3).

One request (context, " " + choice) per choice, tokenised as the harness's `_encode_pair`, scored
by the sum of the continuation's log-probabilities; acc = argmax, acc_norm = argmax of ll /
len(choice in characters). No BOS by default (v0.4.3's causal-LM default, what the paper used);
`add_bos=True` prepends it as harness >= v0.4.10 does for Llama. Contexts too long for the model
are cut on the left, as the harness does, and counted.

Precision: log-softmax in float32 and sums in float64 whatever the model's dtype (the harness
takes log-softmax in the model's dtype), so a bfloat16 model's scores lose nothing more here.

Speed: the default path runs each item's shared prefix (normally the context) once into a KV
cache, copies the cache to the item's choices, runs the choices' remaining tokens in small
batches of similar length, and projects only the scored positions to the vocabulary; the plain
path (one forward per choice) is kept as the reference it must equal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from tqdm import tqdm

import cli


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
        cli.say(f"note: {n} of {total} {what} did not fit in {limit} tokens and lost the start of "
                f"their context")


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


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are: the inputs are built there."""
    return next(model.parameters()).device


def _pad_right(rows: Sequence[Sequence[int]], width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (pad 0: masked anyway) and the matching 0/1 attention mask."""
    ids = torch.tensor([list(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    return ids, mask


def _score_plain(model: torch.nn.Module, request: Request) -> tuple[float, bool]:
    """The reference path: one forward of one request, as the harness does with batch size 1."""
    ids = torch.tensor([request.tokens], device=model_device(model))
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
    device = model_device(model)
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
        "acc_norm_prediction": pred_norm, "correct_norm": pred_norm == item.gold, "choices": list(item.choices),
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


def first_bad(values: torch.Tensor) -> str:
    """The first NaN or inf among `values`, for the NonFinite message."""
    bad = values[~torch.isfinite(values)]
    return str(bad[0].item()) if len(bad) else "finite"


def check_finite(records: Sequence[dict[str, Any]]) -> None:
    """Raise NonFinite naming the first record whose log-likelihoods are NaN or infinite."""
    for r in records:
        values = r.get("loglikelihoods") or []
        if not all(math.isfinite(v) for v in values):
            raise NonFinite(f"non-finite log-likelihoods {values} on item {r['id']}")
