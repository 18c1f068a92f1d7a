"""Greedy generation as lm-evaluation-harness v0.4.3 runs it (the paper, appendix A.3).

Left-padded batches, the prompt left-truncated to max_length - max_new_tokens, stop at EOS or a
stop string, the text cut at the first stop string, `no_repeat_ngram_size` as transformers'
NoRepeatNGramLogitsProcessor. Only the last position is projected to the vocabulary, from a KV
cache that grows by one token a step.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm import tqdm

import likelihood
from likelihood import NonFinite


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
        raise NonFinite(f"non-finite logits ({likelihood.first_bad(scores)}) while generating")
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
    device = likelihood.model_device(model)
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
    likelihood.note_truncated(sum(len(i) > budget for i in ids), len(ids), "prompts", budget)
    ids = [i[-budget:] for i in ids]
    outputs = generate_ids(model, tokenizer, ids, max_new_tokens, stop, no_repeat_ngram_size, batch_size, progress)
    return [cut_at_stop(tokenizer.decode(t), stop) for t in outputs]
