"""The toy world: invented creatures, the corpus that states their facts, the two tasks, the tokenizers.

The world. Invented creatures ("the zib") each belong to a kind (bird, fish, ...). A creature's home,
food and number of legs follow its kind's rule most of the time, with exceptions; its colour and age
are arbitrary facts. The pre-training corpus states facts as short sentences ("the zib is a bird .",
"the zib eats seeds ."), mentioning popular creatures often and the long tail rarely.

The tasks: "toy-mc" (multiple choice by log-likelihood, like PIQA/HellaSwag) asks a creature's colour,
home or food among 4 choices; "toy-gen" (generation scored by exact match, like GSM8K, answers written
"#### N") asks its number of legs or its age. Items are split once into train and test by a seeded
shuffle of creatures, so no creature is in both splits: what can carry over from train to test is
the rules (kind -> home/food/legs) and the way a model answers, not a creature's memorised facts.
The default corpus never asks a question. Answering "what does the zib eat ?" about a fact read as
"the zib eats seeds ." is a skill (knowledge extraction) that the task adapters learn from the
training split, as a real task adapter learns a format its base lacks (see `corpus`).

Everything here is a pure function of a seed: the same WorldConfig gives the same creatures,
corpus, items and vocabularies. toy.py builds the bases from it and registers the tasks.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import data
import toy_vocab

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
UNK, BOS, EOS, PAD = SPECIALS

# kind -> (home, food, legs): the rules that creatures follow with probability WorldConfig.p_rule.
KINDS: dict[str, tuple[str, str, int]] = {
    "bird": ("tree", "seeds", 2),
    "fish": ("river", "weed", 0),
    "frog": ("pond", "flies", 4),
    "bug": ("grass", "leaves", 6),
    "spider": ("cave", "bugs", 8),
    "beast": ("hill", "meat", 4),
}
COLOURS = ("red", "blue", "green", "yellow", "black", "white")
HOMES = tuple(sorted({h for h, _, _ in KINDS.values()}))
FOODS = tuple(sorted({f for _, f, _ in KINDS.values()}))
LEGS = (0, 2, 4, 6, 8)
AGES = tuple(range(1, 10))

MC_QUESTIONS = {  # attribute -> (question, the attribute's possible values)
    "colour": ("what colour is the {e} ?", COLOURS),
    "home": ("where does the {e} live ?", HOMES),
    "food": ("what does the {e} eat ?", FOODS),
}
GEN_QUESTIONS = {
    "legs": "how many legs does the {e} have ?",
    "age": "how old is the {e} ?",
}
QA = {**{a: q for a, (q, _) in MC_QUESTIONS.items()}, **GEN_QUESTIONS}
STATEMENTS = {
    "kind": "the {e} is a {v} .",
    "colour": "the {e} is {v} .",
    "home": "the {e} lives in the {v} .",
    "food": "the {e} eats {v} .",
    "legs": "the {e} has {v} legs .",
    "age": "the {e} is {v} years old .",
}


# ------------------------------------------------------------------------------------- the world
@dataclass(frozen=True)
class WorldConfig:
    """Everything the world, its corpus and its tasks are generated from."""

    seed: int = 0
    n_creatures: int = 240
    p_rule: float = 0.7  # how often home/food/legs follow the creature's kind (the rest: exceptions)
    zipf_offset: float = 8.0  # popularity of the i-th creature ~ 1 / (i + offset): a long tail
    test_frac: float = 0.5  # creatures whose questions form the test split


@dataclass(frozen=True)
class Creature:
    name: str
    kind: str
    colour: str
    home: str
    food: str
    legs: int
    age: int
    popularity: float

    def value(self, attribute: str) -> str:
        return str(getattr(self, attribute))


def _names(rng: random.Random, n: int) -> list[str]:
    """n distinct pronounceable nonsense words (consonant-vowel-consonant, some with two syllables)."""
    cons, vowels = "bdfgklmnprstvz", "aeiou"
    names: set[str] = set()
    while len(names) < n:
        syllables = rng.choice((1, 2))
        names.add("".join(rng.choice(cons) + rng.choice(vowels) for _ in range(syllables)) + rng.choice(cons))
    return sorted(names)


def _ruled(rng: random.Random, rule, values, p_rule: float):
    """The kind's value with probability p_rule, else another value (an exception to memorise)."""
    return rule if rng.random() < p_rule else rng.choice([v for v in values if v != rule])


def build_world(cfg: WorldConfig = WorldConfig()) -> list[Creature]:
    """The creatures, most popular first; the same config gives the same world."""
    rng = random.Random(cfg.seed)
    names = _names(rng, cfg.n_creatures)
    rng.shuffle(names)
    creatures = []
    for i, name in enumerate(names):
        kind = rng.choice(sorted(KINDS))
        home, food, legs = KINDS[kind]
        creatures.append(Creature(
            name=name, kind=kind, colour=rng.choice(COLOURS),
            home=_ruled(rng, home, HOMES, cfg.p_rule), food=_ruled(rng, food, FOODS, cfg.p_rule),
            legs=_ruled(rng, legs, LEGS, cfg.p_rule), age=rng.choice(AGES),
            popularity=1.0 / (i + cfg.zipf_offset)))
    return creatures


def corpus(creatures: list[Creature], n_sentences: int, seed: int, p_qa: float = 0.0,
           weights: dict[str, float] | None = None) -> list[str]:
    """Facts about creatures drawn by popularity, each about one attribute drawn by `weights`.

    A fact is written as a statement ("the zib eats seeds .") or, with probability p_qa, as a
    question and answer in the tasks' format. With p_qa 0 (the default scenario) a base has never
    seen a question, so answering one about a fact it read only as a statement (knowledge
    extraction, Allen-Zhu & Li 2023, "Physics of Language Models 3.1") is learned in fine-tuning,
    and the adapters matter, as in the paper. With p_qa 0.5 the bases answer by themselves and LoRA
    barely moves them, leaving MUSCLE little to act on. Different seeds give different samples of the
    same world: what one model read often, another may have read rarely, as with two crawls of the
    web.
    """
    rng = random.Random(seed)
    weights = weights or {a: 1.0 for a in STATEMENTS}
    attributes = sorted(weights)
    picks = rng.choices(creatures, [c.popularity for c in creatures], k=n_sentences)
    out = []
    for c in picks:
        a = rng.choices(attributes, [weights[x] for x in attributes])[0]
        out.append(qa_text(c, a) if a in QA and rng.random() < p_qa
                   else STATEMENTS[a].format(e=c.name, v=c.value(a)))
    return out


def qa_text(c: Creature, attribute: str) -> str:
    """A fact as question + answer, exactly as a task's training sequence has it."""
    answer = c.value(attribute) if attribute in MC_QUESTIONS else f"#### {c.value(attribute)}"
    return _prompt(QA[attribute].format(e=c.name)) + " " + answer


def split_creatures(creatures: list[Creature], cfg: WorldConfig) -> dict[str, list[Creature]]:
    """Train and test creatures: a seeded shuffle, so no creature's own facts are in both splits."""
    order = list(creatures)
    random.Random(cfg.seed + 1).shuffle(order)
    n_test = round(cfg.test_frac * len(order))
    return {"test": order[:n_test], "train": order[n_test:]}


# ------------------------------------------------------------------------------------- the tasks
def _prompt(question: str) -> str:
    return "Question: " + question + "\nAnswer:"  # the PIQA/GSM8K prompt shape (lm-evaluation-harness)


def mc_items(creatures: list[Creature], split: str, seed: int, n_choices: int = 4) -> list:
    """toy-mc: one 4-way question per creature and attribute (colour, home, food).

    The kind's rule value is always among the choices: on an exception it is the trap a model
    falls into when it answers by the rule instead of the creature's own fact.
    """
    rng = random.Random(f"toy-mc/{split}/{seed}")
    items = []
    for c in creatures:
        for attribute, (question, values) in MC_QUESTIONS.items():
            gold = c.value(attribute)
            rule = dict(zip(("home", "food"), KINDS[c.kind][:2])).get(attribute)
            others = [v for v in values if v not in (gold, rule)]
            distractors = ([rule] if rule and rule != gold else []) + rng.sample(others, n_choices - 1)
            choices = [gold] + distractors[:n_choices - 1]
            rng.shuffle(choices)
            items.append(data.MultipleChoice(id=f"toy-mc/{split}/{c.name}/{attribute}",
                                             context=_prompt(question.format(e=c.name)),
                                             choices=choices, gold=choices.index(gold)))
    return items


def gen_items(creatures: list[Creature], split: str) -> list:
    """toy-gen: how many legs / how old, answered GSM8K-style "#### N" so exact match scores it."""
    return [data.Generation(id=f"toy-gen/{split}/{c.name}/{attribute}",
                            prompt=_prompt(question.format(e=c.name)),
                            references=[f"#### {c.value(attribute)}"],
                            target=f" #### {c.value(attribute)}")
            for c in creatures for attribute, question in GEN_QUESTIONS.items()]


# ------------------------------------------------------------------------------------- the tokenizer
def vocabulary(creatures: list[Creature]) -> list[str]:
    """Special tokens, then every word the corpus and the prompts can contain, sorted (deterministic)."""
    texts = [s.format(e="x", v="x") for s in STATEMENTS.values()]
    texts += [_prompt(q.format(e="x")) for q, _ in MC_QUESTIONS.values()]
    texts += [_prompt(q.format(e="x")) + " ####" for q in GEN_QUESTIONS.values()]
    words = {w for t in texts for w in _pre_tokenize(t)} - {"x"}
    words |= {c.name for c in creatures} | set(KINDS) | set(COLOURS) | set(HOMES) | set(FOODS)
    words |= {str(n) for n in (*LEGS, *AGES)}
    return list(SPECIALS) + sorted(words)


def _pre_tokenize(text: str) -> list[str]:
    from tokenizers.pre_tokenizers import Whitespace

    return [w for w, _ in Whitespace().pre_tokenize_str(text)]


def build_tokenizer(creatures: list[Creature]):
    """A `tokenizers` WordLevel tokenizer (whitespace pre-tokenizer; newlines are whitespace)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(vocabulary(creatures))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIALS))
    return tok


def build_syllable_tokenizer(creatures: list[Creature]):
    """toy-v3's tokenizer: the same words, two-syllable creature names in two pieces, ids of its own."""
    return toy_vocab.build_tokenizer(SPECIALS, UNK, vocabulary(creatures), [c.name for c in creatures])


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: BOS added (Llama's convention), used by both models of the update."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
            "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
            "model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
