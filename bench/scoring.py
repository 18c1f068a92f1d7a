"""Log-likelihood multiple-choice scoring: likelihood.score_choices vs lm-evaluation-harness's HFLM.

Both sides score the same items on the same random small Llama (bench/common.py SMALL_LM) with
the same BPE tokenizer, and must pick the same answer for every item (acc and acc_norm). The
harness runs offline: its HF backend is given the transformers model object and tokenizer, and
its `loglikelihood` is fed `Instance` requests directly (one per choice, context and " " + choice,
as its PIQA/HellaSwag task configs build them), so no task registry and no dataset download.

Items: the first --piqa items of the real PIQA validation set (../shared/data/piqa), and
--hellaswag items in HellaSwag's upstream record shape. The real HellaSwag files are not in
../shared/data (see its README), so those records are built from PIQA train items: context =
activity label + the goal, four endings = this item's two solutions and the next item's two.
They have HellaSwag's structure (one context, four endings of a sentence or two) and are read
by data.load_task("hellaswag"), but they are not HellaSwag text.

    python bench/scoring.py [--piqa 48] [--hellaswag 24] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import common

BATCH = 32  # choice sequences per forward on both sides


def hellaswag_shaped_dir(n: int) -> Path:
    """A data dir with hellaswag/hellaswag_val.jsonl in the upstream shape, built from PIQA train."""
    root = common.CACHE / "hellaswag-shaped"
    lines = (common.DATA / "piqa" / "train.jsonl").read_text().splitlines()
    labels = (common.DATA / "piqa" / "train-labels.lst").read_text().split()
    records = []
    for i in range(n):
        a, b = json.loads(lines[2 * i]), json.loads(lines[2 * i + 1])
        records.append({"ind": i, "activity_label": "Home and Garden", "ctx_a": a["goal"], "ctx_b": "",
                        "ctx": a["goal"], "split": "val", "split_type": "indomain", "label": int(labels[2 * i]),
                        "endings": [a["sol1"], a["sol2"], b["sol1"], b["sol2"]], "source_id": f"piqa-train-{2 * i}"})
    path = root / "hellaswag" / "hellaswag_val.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def load_items(n_piqa: int, n_hellaswag: int) -> dict[str, list]:
    import data

    return {"piqa": data.load_task("piqa", "validation", common.DATA)[:n_piqa],
            "hellaswag-shaped": data.load_task("hellaswag", "validation", hellaswag_shaped_dir(n_hellaswag))}


# ------------------------------------------------------------------------------------ the sides
def ours(model: torch.nn.Module, tokenizer: Any, items: Sequence) -> list[list[float]]:
    import likelihood

    records = likelihood.score_choices(model, tokenizer, items, batch_size=BATCH, add_bos=False)
    return [r["loglikelihoods"] for r in records]


def harness(lm: Any, items: Sequence) -> list[list[float]]:
    """HFLM.loglikelihood over one Instance per choice, regrouped per item."""
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", doc={}, arguments=(it.context, " " + c), idx=j)
                for it in items for j, c in enumerate(it.choices)]
    results = iter(lm.loglikelihood(requests, disable_tqdm=True))
    return [[next(results)[0] for _ in it.choices] for it in items]


def predictions(items: Sequence, lls: list[list[float]]) -> list[tuple[int, int]]:
    """(acc prediction, acc_norm prediction) per item, with the first maximum as numpy's argmax."""
    import likelihood

    return [(r["prediction"], r["acc_norm_prediction"])
            for r in (likelihood.choice_record(it, [(ll, False) for ll in row]) for it, row in zip(items, lls))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--piqa", type=int, default=48)
    p.add_argument("--hellaswag", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    common.setup()
    from lm_eval.models.huggingface import HFLM

    import models

    path = common.small_lm()
    model, tokenizer = models.load_model(path), models.load_tokenizer(path)
    lm = HFLM(pretrained=common.load_reference(path), tokenizer=common.reference_tokenizer(path),
              batch_size=BATCH, max_length=common.SMALL_LM["max_position_embeddings"])
    rows = []
    for task, items in load_items(args.piqa, args.hellaswag).items():
        ll_ours, ll_ref = ours(model, tokenizer, items), harness(lm, items)
        same = predictions(items, ll_ours) == predictions(items, ll_ref)
        max_diff = max(abs(a - b) for ra, rb in zip(ll_ours, ll_ref) for a, b in zip(ra, rb))
        assert same, f"{task}: predictions differ between ours and the harness (max |d ll| {max_diff:.2e})"
        timings = common.interleave({"ours": lambda: ours(model, tokenizer, items),
                                     "harness": lambda: harness(lm, items)}, args.repeats)
        t_ours, t_ref = timings["ours"].median, timings["harness"].median
        n_req = sum(len(it.choices) for it in items)
        rows.append([task, len(items), n_req, f"{len(items) / t_ours:.2f}", f"{len(items) / t_ref:.2f}",
                     f"**{t_ref / t_ours:.2f}x**", "identical", f"{max_diff:.1e}"])
    header = ["items", "n", "requests", "ours items/s", "harness items/s", "ratio (target >= 2)",
              "acc / acc_norm predictions", "max abs ll difference"]
    cfg = ", ".join(f"{k}={v}" for k, v in common.SMALL_LM.items() if v is not None and k != "model_type")
    import lm_eval

    body = (f"Random Llama ({cfg}), float32, byte-level BPE tokenizer trained on PIQA + GSM8K text "
            f"({common.SMALL_LM_TOKENS} tokens), no BOS. Ours: `likelihood.score_choices` (shared-prefix fast path), "
            f"batch {BATCH} choice rows. Reference: lm-evaluation-harness {lm_eval.__version__} `HFLM` "
            f"(transformers model object, batch {BATCH}) `.loglikelihood` on `Instance` requests. "
            f"{args.repeats} interleaved repeats after 1 warm-up, medians. HellaSwag-shaped items are built "
            f"from PIQA train text in HellaSwag's upstream record shape (no HellaSwag data here).\n\n"
            + common.table(header, rows))
    common.write_section("scoring", "Multiple-choice scoring: ours vs lm-evaluation-harness HFLM", body)


if __name__ == "__main__":
    main()
