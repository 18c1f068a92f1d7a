"""toy_vocab.py: toy-v3's tokenizer (names in syllables, other ids) against toy-v1's word-level
one, and what cross_vocab.py makes of the pair (the update toy-v1 -> toy-v3)."""
import json

import pytest
import torch

import cross_vocab
import tokenizer
import toy
import toy_vocab
import toy_world

MICRO = toy.SCENARIOS["micro"].world


def test_long_names_split_after_their_first_syllable():
    assert toy_vocab.pieces("zabuk") == ["za", "+buk"]
    assert toy_vocab.pieces("zib") == ["zib"]


def test_a_name_shadowed_by_a_longer_word_stays_whole():
    tok = toy_vocab.build_tokenizer(toy_world.SPECIALS, toy_world.UNK, ["bug", "the", "bugal", "zibak"],
                                    ["bugal", "zibak"])
    assert tok.encode("the bugal zibak").tokens == ["the", "bugal", "zi", "+bak"]


def _load(tmp_path, name, tok):
    d = tmp_path / name
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(toy_world.tokenizer_config(128)))
    return tokenizer.load_tokenizer_dir(d)


@pytest.fixture
def pair(tmp_path):
    creatures = toy_world.build_world(MICRO)
    return (creatures, _load(tmp_path, "v1", toy_world.build_tokenizer(creatures)),
            _load(tmp_path, "v3", toy_world.build_syllable_tokenizer(creatures)))


def test_v3_has_its_own_ids_and_every_word_but_the_names(pair):
    creatures, v1, v3 = pair
    names = {c.name for c in creatures}
    words = set(toy_world.vocabulary(creatures)) - names - set(toy_world.SPECIALS)
    ids_v1 = {w: v1.backend.token_id(w) for w in words}
    ids_v3 = {w: v3.backend.token_id(w) for w in words}
    assert None not in ids_v3.values()
    assert sum(ids_v1[w] == ids_v3[w] for w in words) < len(words) / 2
    assert not any(v3.backend.token_id(n) for n in names if len(n) > 3)
    assert all(v3.backend.token_id(n) is not None for n in names if len(n) == 3)


def test_toy_pair_alignment_by_hand(pair):
    creatures, v1, v3 = pair
    name = next(c.name for c in creatures if len(c.name) == 5)
    text = f"Question: what does the {name} eat ?\nAnswer: seeds"
    # v1: BOS Question : what does the NAMEX eat ? Answer : seeds EOS
    # v3: BOS Question : what does the NA +MEX eat ? Answer : seeds EOS
    new_ids = v3.encode(text) + [v3.eos_id]
    old_ids, old_position = cross_vocab.encode_aligned(v3, v1, text, new_ids, max_len=64)
    assert len(old_ids) == 13 and len(new_ids) == 14
    assert old_position == [0, 1, 2, 3, 4, 5, -1, 6, 7, 8, 9, 10, 11, -1]


def test_toy_vocab_map_shares_the_words_not_the_names(pair):
    creatures, v1, v3 = pair
    vmap = cross_vocab.model_vocab_map(v1, v3, v1.vocab_size, v3.vocab_size)
    names = {c.name for c in creatures}
    for word in ("seeds", "Answer", "the", ":", "####", "4"):
        assert vmap.old_to_new[v1.backend.token_id(word)] == v3.backend.token_id(word)
    assert all(vmap.old_to_new[v1.backend.token_id(n)] == -1 for n in names
               if v3.backend.token_id(n) is None)
    new_only = {v3.backend.tok.id_to_token(i) for i in vmap.new_only.nonzero().squeeze(-1).tolist()}
    assert new_only == {p for n in names for p in toy_vocab.pieces(n)} - set(toy_world.vocabulary(creatures))


def test_prefix_maps_a_split_name_to_its_first_syllable(pair):
    """--cross-vocab prefix: a name v3 splits ("zabuk", one v1 token) maps to its first piece
    ("za"), shared by the names that start with it; their probabilities add up there, and M1's
    teacher sums to 1 with nothing left to fill."""
    creatures, v1, v3 = pair
    vmap = cross_vocab.model_vocab_map(v1, v3, v1.vocab_size, v3.vocab_size, "prefix")
    exact = cross_vocab.model_vocab_map(v1, v3, v1.vocab_size, v3.vocab_size)
    split = [c.name for c in creatures if v3.backend.token_id(c.name) is None]
    assert split and all(vmap.old_to_new[v1.backend.token_id(n)] == v3.backend.token_id(n[:2])
                         for n in split)
    changed = (vmap.old_to_new != exact.old_to_new).nonzero().squeeze(-1).tolist()
    assert sorted(changed) == sorted(v1.backend.token_id(n) for n in split)
    new_only = {v3.backend.tok.id_to_token(i) for i in vmap.new_only.nonzero().squeeze(-1).tolist()}
    assert new_only == {toy_vocab.pieces(n)[1] for n in split}
    first, *_ = split
    same_start = [n for n in split if n[:2] == first[:2]]
    p_old = torch.zeros(1, v1.vocab_size)
    p_old[0, v1.backend.token_id("seeds")] = 0.5
    for n in same_start:
        p_old[0, v1.backend.token_id(n)] = 0.5 / len(same_start)
    mapped = cross_vocab.map_probs(p_old, vmap.old_to_new, v3.vocab_size)
    assert mapped[0, v3.backend.token_id(first[:2])] == pytest.approx(0.5)
    assert mapped[0, v3.backend.token_id("seeds")] == 0.5
    teacher = cross_vocab.teacher_from_old(mapped, torch.full((1, v3.vocab_size), 1 / v3.vocab_size),
                                           vmap.new_only, "prefix")
    assert torch.equal(teacher, mapped)
