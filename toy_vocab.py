"""The toy world's second tokenizer: long creature names in two pieces, other words whole, own ids.

toy-v1 and toy-v2 share one word-level vocabulary, where every creature name is one token. An
update that changes the vocabulary (Llama 2 -> Llama 3) needs a base that reads the same text
through other tokens: toy-v3 (toy.py) reads it through this tokenizer. A two-syllable name is
cut after its first syllable ("zabuk" -> "za" "+buk", "+" marking a piece that continues a
word, as WordPiece's "##" does); a one-syllable name stays whole. So the two vocabularies share
every word except half the names, whose first pieces are shared between creatures (as a new
tokenizer's subwords are) while their last piece still tells them apart. The ids follow
another order than toy_world.vocabulary's (words sorted by their reversed spelling), so no id means
the same in both.
"""
from __future__ import annotations

CONTINUES = "+"  # WordPiece's continuing-subword prefix ("##" would clash with the answers' "####")
RECIPE = "syllable-wordpiece-v2"  # part of toy-v3's recipe: a change here rebuilds it


def pieces(name: str) -> list[str]:
    """The tokens of a name: a two-syllable name's first syllable (consonant, vowel), then the
    rest marked as a continuation; a one-syllable name (consonant, vowel, consonant) whole."""
    return [name] if len(name) <= 3 else [name[:2], CONTINUES + name[2:]]


def vocabulary(specials: tuple[str, ...], words: list[str], names: list[str]) -> list[str]:
    """Special tokens, then the words that are not names and every name's pieces, in an order
    of their own (sorted by reversed spelling).

    WordPiece takes the longest entry a word starts with, so a name that starts with a longer
    word ("bugal" with "bug") would not come out in its syllables: such a name stays whole."""
    name_set = set(names)
    entries = {w for w in words if w not in name_set and w not in specials}
    shadowed = {n for n in names if any(n.startswith(w) and len(w) > 2 for w in entries)}
    entries |= shadowed | {p for n in names if n not in shadowed for p in pieces(n)}
    return list(specials) + sorted(entries, key=lambda w: (w[::-1], w))


def build_tokenizer(specials: tuple[str, ...], unk: str, words: list[str], names: list[str]):
    """A `tokenizers` WordPiece tokenizer (whitespace pre-tokenizer, as toy_world.build_tokenizer's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(vocabulary(specials, words, names))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk, continuing_subword_prefix=CONTINUES))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix=CONTINUES, cleanup=False)
    tok.add_special_tokens(list(specials))
    return tok
