"""cross_vocab.py on real tokenizer shapes: a Llama-2-style sentencepiece model and a Llama-3-style
byte-level BPE, both trained here on GSM8K questions; and the cross-vocabulary loss."""
import json

import pytest
import torch

import cross_vocab
import muscle
import tokenizer

EXTRA = ["Café naïve über 12,345 €5 — ok", "Line one\nline two\n\n  spaced   out"]


def _texts(data_dir):
    with open(data_dir / "gsm8k" / "train.jsonl") as f:
        questions = [json.loads(line)["question"] for _, line in zip(range(2000), f)]
    return questions + EXTRA * 3


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """Llama 2's kind: sentencepiece BPE with byte fallback and split digits, BOS added, shipped
    as tokenizer.model with a LlamaTokenizer tokenizer_config.json."""
    import sentencepiece as spm

    from conftest import DATA_DIR
    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(_texts(DATA_DIR)))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=800,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, bos_id=1, eos_id=2, unk_id=0, minloglevel=2,
        character_coverage=0.999)
    (d / "corpus.txt").unlink()
    (d / "tokenizer.vocab").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
         "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True}))
    return d


@pytest.fixture(scope="module")
def sp(sp_dir):
    return tokenizer.load_tokenizer_dir(sp_dir)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """Llama 3's kind: byte-level BPE, BOS declared by the post-processor, own special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from conftest import DATA_DIR
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_texts(DATA_DIR), trainers.BpeTrainer(
        vocab_size=900, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    d = tmp_path_factory.mktemp("bpe")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    return tokenizer.load_tokenizer_dir(d)


@pytest.fixture(autouse=True)
def _needs_data(data_dir):
    """Every test here trains its tokenizers on the shared GSM8K questions."""


def _pieces(tok, text):
    ids, _ = tok.encode_with_offsets(text)
    surfaces = tok.surfaces()
    return [surfaces[i] if surfaces[i] is not None else "BOS" for i in ids]


# ------------------------------------------------------------------------------ hand-worked cases

# He has 12 apples.  sp:  BOS | ▁He | ▁has | ▁ | 1 | 2 | ▁apples | .      (split digits)
#                    bpe: BOS | H | e | Ġhas | Ġ12 | Ġapples | .
# Position t has read: sp 0, 2, 6, 7, 8, 9, 16, 17; bpe 0, 1, 2, 6, 9, 16, 17 (+ EOS: nothing).
# bpe's "H" (read 1) has no sp partner, nor does EOS (it predicts nothing).
APPLES = ("He has 12 apples.",
          ["BOS", b" He", b" has", b" ", b"1", b"2", b" apples", b"."],
          ["BOS", b"H", b"e", b" has", b" 12", b" apples", b"."],
          [0, -1, 1, 2, 5, 6, 7, -1])
# é is two bytes: sp spells it <0xC3> <0xA9> (the first with an empty span), bpe "Ã" "©" (both
# spanning the character); € is three bytes. Positions inside a character align with nothing;
# the two newlines and the space before € are tokens of their own in both.
CAFE = ("Café 12 costs\n\n €5.",
        ["BOS", b" C", b"a", b"f", b"\xc3", b"\xa9", b" ", b"1", b"2", b" costs", b"\n", b"\n", b" ",
         b"\xe2", b"\x82", b"\xac", b"5", b"."],
        ["BOS", b"C", b"a", b"f", b"\xc3", b"\xa9", b" 12", b" costs", b"\n", b"\n", b" ", b"\xe2",
         b"\x82", b"\xac", b"5", b"."],
        [0, 1, 2, 3, -1, 5, 8, 9, 10, 11, 12, -1, -1, 15, 16, 17, -1])


@pytest.mark.parametrize("case", [APPLES, CAFE], ids=["digits", "non-ascii-newlines"])
def test_alignment_matches_hand_worked_examples(sp, bpe, case):
    text, sp_pieces, bpe_pieces, expected = case
    assert _pieces(sp, text) == sp_pieces and _pieces(bpe, text) == bpe_pieces
    new_ids = bpe.encode(text) + [bpe.eos_id]
    old_ids, old_position = cross_vocab.encode_aligned(bpe, sp, text, new_ids, max_len=64)
    assert old_ids == sp.encode(text) + [sp.eos_id]
    assert old_position == expected


def _prefixes(tok, ids, strip_dummy_space):
    """Per position, the text its tokens spell (from the vocabulary's surfaces), or None when
    it ends inside a character."""
    surfaces, out, spelled = tok.surfaces(), [], b""
    for t, i in enumerate(ids):
        spelled += surfaces[i] if (t or i != tok.bos_id) and surfaces[i] is not None else b""
        raw = spelled[1:] if strip_dummy_space and spelled.startswith(b" ") else spelled
        try:
            out.append(raw.decode())
        except UnicodeDecodeError:
            out.append(None)
    return out


def test_aligned_positions_have_read_the_same_text(sp, bpe, data_dir):
    """On 200 real questions: a bpe position is aligned with an sp position exactly when both
    spell the same text, found independently from the tokens' surfaces."""
    aligned = total = 0
    for text in _texts(data_dir)[:200]:
        new_ids = bpe.encode(text) + [bpe.eos_id]
        old_ids, old_position = cross_vocab.encode_aligned(bpe, sp, text, new_ids, max_len=512)
        new_text = _prefixes(bpe, new_ids[:-1], False)
        old_text = _prefixes(sp, old_ids[:-1], True)
        expected = [old_text.index(p) if p is not None and p in old_text else -1 for p in new_text]
        assert old_position[:-1] == expected, text
        aligned += sum(p >= 0 for p in old_position[:-1])
        total += len(new_ids) - 1
    assert 0.99 < aligned / total < 1  # both split words at spaces: most boundaries agree


def test_truncated_sequences_align_from_the_same_character(sp, bpe):
    text = "Natalia sold 48 clips in April and half as many in May."
    full = bpe.encode(text) + [bpe.eos_id]
    cut = full[:1] + full[5:]  # BOS + what data.encode_pair keeps of a sequence 4 too long
    old_ids, old_position = cross_vocab.encode_aligned(bpe, sp, text, cut, max_len=64)
    assert old_ids[0] == sp.bos_id and len(old_position) == len(cut)
    assert old_position[0] == -1  # BOS now precedes a cut text: it has read no prefix of it
    _, old_full = cross_vocab.encode_aligned(bpe, sp, text, full, max_len=512)
    shift = (len(sp.encode(text)) + 1) - len(old_ids)  # sp tokens dropped on the left
    assert shift == 4  # N at al ia: the sp tokens before " sold", where the student's start
    assert [p - shift if p >= 0 else -1 for p in old_full[5:]] == old_position[1:]
    # max_len cuts M1's tokens on the left too: one more (" sold") goes, and what read it.
    short_ids, short_position = cross_vocab.encode_aligned(bpe, sp, text, cut, max_len=len(cut))
    assert short_ids == old_ids[:1] + old_ids[2:] and short_position[1] == -1
    assert short_position[2:] == [p - 1 if p > 0 else -1 for p in old_position[2:]]


# ------------------------------------------------------------------------------ one vocabulary, two files

LEADING_SPACE = [" one leading space", "  two leading", " \nnewline after a space", "\tTab first"]


@pytest.fixture(scope="module")
def sp_json(sp_dir, tmp_path_factory):
    """The tokenizer.json that transformers' converter makes of sp's tokenizer.model (the oracle
    of the conversion, as hub repositories of Llama 2 ship both files)."""
    pytest.importorskip("google.protobuf", reason="transformers converts tokenizer.model through protobuf")
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("sp-json")
    transformers.AutoTokenizer.from_pretrained(str(sp_dir)).save_pretrained(str(d))
    assert not (d / "tokenizer.model").exists()
    return tokenizer.load_tokenizer_dir(d)


def _next_token_after_each_prefix(tok, text):
    """{characters read: the id of the token that follows}, over the positions that have read a
    whole prefix of `text` (EOS last): what an aligned position's label is."""
    ids, spans = cross_vocab._with_eos(tok, text)
    read = cross_vocab.read_up_to(ids, spans, tok.bos_id)
    return {n: ids[t + 1] for t, n in enumerate(read[:-1]) if n is not None}


def test_tokenizer_model_and_its_tokenizer_json_align_one_to_one(sp, sp_json, data_dir):
    """The two files Llama 2 ships for one vocabulary give cross_vocab the same surfaces and, on
    real questions with digits, newlines and non-ASCII text, the same tokens and prefixes read,
    so a pair of them aligns every position with itself and maps every id to itself."""
    assert type(sp.backend).__name__ == "_SentencePiece"
    assert type(sp_json.backend).__name__ == "_HFTokenizers"
    assert sp.surfaces() == sp_json.surfaces()
    assert (sp.bos_id, sp.eos_id) == (sp_json.bos_id, sp_json.eos_id)
    # Every id maps to itself but <unk> (it spells nothing) and the byte pieces of bytes that an
    # ordinary piece also writes, which map to that piece, the id sentencepiece emits for them.
    mapping = cross_vocab.vocab_map(sp, sp_json).tolist()
    space, byte_space = sp.backend.sp.piece_to_id("\u2581"), sp.backend.sp.piece_to_id("<0x20>")
    moved = {i: j for i, j in enumerate(mapping) if i != j}
    assert moved[0] == -1 and moved[byte_space] == space
    assert all(sp.backend.sp.is_byte(i) and sp.surfaces()[i] == sp.surfaces()[j]
               and not sp.backend.sp.is_byte(j) for i, j in moved.items() if i)
    texts = _texts(data_dir)[:400] + EXTRA + LEADING_SPACE
    spans_differ = 0
    for text in texts:
        (ids_a, spans_a), (ids_b, spans_b) = (t.encode_with_offsets(text) for t in (sp, sp_json))
        next_a, next_b = (_next_token_after_each_prefix(t, text) for t in (sp, sp_json))
        if text[:1].isspace():
            # sentencepiece adds its dummy "▁" even before a space (an empty span: it has read
            # nothing and never aligns); converters that prepend it only to text not starting
            # with one leave it out, so only what follows BOS can differ.
            assert {n: i for n, i in next_a.items() if n} == {n: i for n, i in next_b.items() if n}
            continue
        assert ids_a == ids_b and next_a == next_b, text
        spans_differ += spans_a != spans_b
        new_ids = ids_b + [sp_json.eos_id]
        old_ids, old_position = cross_vocab.encode_aligned(sp_json, sp, text, new_ids, max_len=512)
        assert old_ids == new_ids
        read = cross_vocab.read_up_to(*cross_vocab._with_eos(sp_json, text), sp_json.bos_id)
        # Positions reading a whole prefix align with themselves; EOS and those inside a
        # character (split into byte pieces) with nothing.
        assert old_position == [t if n is not None and t < len(read) - 1 else -1
                                for t, n in enumerate(read)], text
    # sentencepiece gives a character's leading byte pieces empty spans, tokenizers the whole
    # character: different offsets, the same prefixes read (above).
    assert spans_differ > 0


# ------------------------------------------------------------------------------ vocabularies


def test_vocab_map_matches_surfaces_and_bytes_one_to_one(sp, bpe):
    mapping = cross_vocab.vocab_map(sp, bpe)
    sp_s, bpe_s = sp.surfaces(), bpe.surfaces()
    for i, j in enumerate(mapping.tolist()):
        if j >= 0 and i not in (sp.bos_id, sp.eos_id):
            assert sp_s[i] == bpe_s[j]
    byte_pieces = [i for i in range(sp.vocab_size) if sp.backend.sp.is_byte(i)]
    assert len(byte_pieces) == 256
    assert sorted(bpe_s[mapping[i]][0] for i in byte_pieces) == list(range(256))
    assert mapping[sp.eos_id] == bpe.eos_id and mapping[sp.bos_id] == bpe.bos_id
    assert mapping[sp.encode("apples", add_bos=False)[0]] == bpe.backend.token_id("Ġapples")
    unmapped = [i for i in range(sp.vocab_size) if mapping[i] < 0]
    assert unmapped[0] == 0  # <unk> spells nothing
    assert not {sp_s[i] for i in unmapped[1:]} & set(bpe_s)  # the rest: no bpe token spells them
    assert len(unmapped) < 0.01 * sp.vocab_size  # (" John", "ses", ...)


def test_prefix_maps_what_no_token_spells_to_the_longest_prefix(sp, bpe):
    """--cross-vocab prefix: an sp piece that no bpe token spells (" John") maps to the bpe token
    writing the longest proper prefix of its bytes; every other id maps as without it."""
    exact, prefix = cross_vocab.vocab_map(sp, bpe), cross_vocab.vocab_map(sp, bpe, prefix=True)
    sp_s, bpe_s = sp.surfaces(), bpe.surfaces()
    unmapped = [i for i in range(1, sp.vocab_size) if exact[i] < 0]
    assert unmapped and (prefix[exact >= 0] == exact[exact >= 0]).all() and prefix[0] == -1
    spelled = {s for s in bpe_s if s is not None}
    for i in unmapped:
        target = bpe_s[prefix[i]]
        assert sp_s[i].startswith(target) and len(target) < len(sp_s[i])
        assert not any(sp_s[i][:n] in spelled for n in range(len(target) + 1, len(sp_s[i])))
    john = sp.backend.token_id("\u2581John")
    assert exact[john] == -1 and bpe_s[prefix[john]] in (b" Jo", b" Joh", b" J")


def test_model_vocab_map_pads_and_marks_new_only_ids(sp, bpe):
    vmap = cross_vocab.model_vocab_map(sp, bpe, old_vocab=sp.vocab_size + 4,
                                       new_vocab=bpe.vocab_size + 6)
    assert vmap.old_to_new.shape == (sp.vocab_size + 4,) and (vmap.old_to_new[-4:] == -1).all()
    reached = set(vmap.old_to_new[vmap.old_to_new >= 0].tolist())
    new_only = set(vmap.new_only.nonzero().squeeze(-1).tolist())
    assert not new_only & reached and not vmap.new_only[-6:].any()
    assert bpe.backend.token_id("Ġ12") in new_only  # sp splits digits: no sp piece " 12"
    assert len(reached) + len(new_only) == bpe.vocab_size - 2 + 2  # all but 2 specials + EOS/BOS


def test_mapped_probabilities_sum_to_kept_mass_and_teachers_to_one():
    # Old vocab of 4 -> new vocab of 5: old 0 -> 1, old 1 and 2 -> 3 (both spell it), old 3 unmapped.
    mapping = torch.tensor([1, 3, 3, -1])
    p_old = torch.tensor([[.1, .2, .3, .4], [.25, .25, .25, .25]], dtype=torch.float64)
    mapped = cross_vocab.map_probs(p_old, mapping, 5)
    assert mapped.tolist() == [[0, .1, 0, .5, 0], [0, .25, 0, .5, 0]]
    new_only = torch.tensor([True, False, True, False, False])  # 4: special, never filled
    p_new = torch.tensor([[.3, .1, .1, .1, .4], [.2, .2, .2, .2, .2]], dtype=torch.float64)
    fill = cross_vocab.teacher_from_old(mapped, p_new, new_only, "fill")
    # The 0.4 left over goes to new-only ids 0 and 2 in M2's proportions 3:1.
    assert fill[0].tolist() == pytest.approx([.3, .1, .1, .5, 0])
    assert fill[1].tolist() == pytest.approx([.125, .25, .125, .5, 0])
    renorm = cross_vocab.teacher_from_old(mapped, p_new, new_only, "renorm")
    assert renorm[0].tolist() == pytest.approx([0, 1 / 6, 0, 5 / 6, 0])
    for t in (fill, renorm):
        assert t.sum(-1).tolist() == pytest.approx([1, 1])


# ------------------------------------------------------------------------------ the loss


def _heads_and_states(seed, batch=2, length=6, hidden=5, vocab=7):
    g = torch.Generator().manual_seed(seed)
    heads = [torch.nn.Linear(hidden, vocab, dtype=torch.float64) for _ in range(3)]
    for h in heads:
        torch.nn.init.normal_(h.weight, generator=g)
    hs = [torch.randn(batch, length, hidden, generator=g, dtype=torch.float64) for _ in range(3)]
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[1, 4:] = muscle.IGNORE_INDEX
    return heads, hs, labels


MAPPING_RULES = [r for r in cross_vocab.CHOICES if r != "uld"]


@pytest.mark.parametrize("mask", ["student_correct", "new_only", "token_likelihood"])
@pytest.mark.parametrize("rule", MAPPING_RULES)
def test_one_vocabulary_seen_as_two_gives_the_paper_loss(mask, rule):
    """Identity map, identity alignment: the cross loss equals muscle_loss_chunked, value and
    gradient, for every rule that maps M1's distribution (nothing is unmapped)."""
    heads, (hs, ho, hn), labels = _heads_and_states(0)
    vmap = cross_vocab.VocabMap(torch.arange(7), torch.zeros(7, dtype=torch.bool))
    everywhere = torch.ones(2, 6, dtype=torch.bool)
    student = hs.clone().requires_grad_()
    out = cross_vocab.muscle_loss_cross(student, ho, hn, heads, labels, everywhere, vmap, rule,
                                        mask, ce_weight=0.3, chunk_size=4)
    out.loss.backward()
    ref_student = hs.clone().requires_grad_()
    ref = muscle.muscle_loss_chunked(ref_student, ho, hn, heads, labels, mask, ce_weight=0.3,
                                     chunk_size=4)
    ref.loss.backward()
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-12)
    assert torch.allclose(student.grad, ref_student.grad, rtol=1e-10, atol=1e-12)
    assert (out.tokens, out.follow_old, out.aligned, out.unaligned) == (ref.tokens, ref.follow_old, 8, 0)
    assert out.mapped_mass == pytest.approx(8.0)


def test_unaligned_positions_follow_the_new_model_and_are_counted():
    heads, (hs, ho, hn), labels = _heads_and_states(1)
    vmap = cross_vocab.VocabMap(torch.arange(7), torch.zeros(7, dtype=torch.bool))
    nowhere = torch.zeros(2, 6, dtype=torch.bool)
    out = cross_vocab.muscle_loss_cross(hs, ho, hn, heads, labels, nowhere, vmap)
    control = muscle.muscle_loss_chunked(hs, ho, hn, heads, labels, "new_only")
    wrong = muscle.muscle_loss_chunked(hs, ho, hn, heads, labels).follow_old
    assert out.loss.item() == pytest.approx(control.loss.item(), rel=1e-12)
    assert (out.follow_old, out.aligned, out.unaligned, out.mapped_mass) == (0, 0, wrong, 0.0)
    assert wrong > 0


def _two_vocabularies(seed):
    """_heads_and_states with M1 of 9 ids (its own head and hidden states), 6 of them mapped onto
    the student's 7, two of those reached by no old id."""
    heads, (hs, _, hn), labels = _heads_and_states(seed)
    g = torch.Generator().manual_seed(seed + 1)
    old_head = torch.nn.Linear(5, 9, dtype=torch.float64)
    ho = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    vmap = cross_vocab.VocabMap(torch.tensor([0, 1, 2, -1, 3, 3, -1, 5, -1]),
                                torch.tensor([False, False, False, False, True, False, True]))
    return (heads[0], old_head, heads[2]), (hs, ho, hn), labels, vmap


@pytest.mark.parametrize("rule", cross_vocab.CHOICES)
def test_two_vocabularies_chunked_equals_one_chunk(rule):
    """Different widths (old 9, new 7), partial map and alignment: chunk size changes nothing."""
    heads, (hs, ho, hn), labels, vmap = _two_vocabularies(2)
    aligned = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 1, 0]], dtype=torch.bool)
    grads, losses = [], []
    for chunk in (3, 1000):
        student = hs.clone().requires_grad_()
        out = cross_vocab.muscle_loss_cross(student, ho, hn, heads, labels, aligned, vmap, rule,
                                            chunk_size=chunk)
        out.loss.backward()
        grads.append(student.grad)
        losses.append(out)
    assert losses[0].loss.item() == pytest.approx(losses[1].loss.item(), rel=1e-12)
    assert torch.allclose(*grads) and losses[0][1:] == pytest.approx(losses[1][1:])
    assert 0 < losses[0].mapped_mass < losses[0].aligned  # part of M1's mass is unmapped
    assert losses[0].follow_old > 0


def test_uld_distance_by_hand():
    """Sorted: (.5, .3, .2, 0) against (.6, .3, .1, 0): |.5-.6| + 0 + |.2-.1| + 0 = 0.2; a
    permutation of the same probabilities is at distance 0."""
    p = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.6, 0.3, 0.0], [0.3, 0.0, 0.2, 0.5]], dtype=torch.float64)
    assert cross_vocab.sorted_l1(p, q).tolist() == pytest.approx([0.2, 0.0], abs=1e-15)


def test_uld_replaces_the_kl_where_the_student_follows_m1():
    """--cross-vocab uld: T^2 * sorted-L1 to M1's own distribution (9 ids, no map) where the
    student is wrong, T^2 * KL to M2 where it is right, CE on every token; computed by hand."""
    heads, (hs, ho, hn), labels, vmap = _two_vocabularies(4)
    everywhere = torch.ones(2, 6, dtype=torch.bool)
    t, ce_weight = 2.0, 0.3
    out = cross_vocab.muscle_loss_cross(hs, ho, hn, heads, labels, everywhere, vmap, "uld",
                                        temperature=t, ce_weight=ce_weight)
    z_s, z_o, z_n = heads[0](hs)[:, :-1], heads[1](ho)[:, :-1], heads[2](hn)[:, :-1]
    y = labels[:, 1:]
    real, wrong = y != muscle.IGNORE_INDEX, z_s.argmax(-1) != y
    p_s = torch.softmax(z_s / t, -1)
    kl = (torch.softmax(z_n / t, -1) * (torch.log_softmax(z_n / t, -1) - p_s.log())).sum(-1)
    uld = cross_vocab.sorted_l1(p_s.flatten(0, 1), torch.softmax(z_o / t, -1).flatten(0, 1)).view_as(kl)
    ce = torch.nn.functional.cross_entropy(z_s.transpose(1, 2), y.clamp(min=0), reduction="none")
    expected = (t**2 * torch.where(wrong, uld, kl) + ce_weight * ce)[real].sum()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-9)
    assert out.follow_old == int((wrong & real).sum()) > 0


def test_sequence_masks_are_refused():
    heads, (hs, ho, hn), labels = _heads_and_states(0)
    vmap = cross_vocab.VocabMap(torch.arange(7), torch.zeros(7, dtype=torch.bool))
    with pytest.raises(ValueError, match="per-token mask"):
        cross_vocab.muscle_loss_cross(hs, ho, hn, heads, labels, torch.ones(2, 6, dtype=torch.bool),
                                      vmap, mask="instance_likelihood")


def test_coverage_counts_training_forwards_only():
    heads, (hs, ho, hn), labels = _heads_and_states(2)
    vmap = cross_vocab.VocabMap(torch.tensor([0, 1, 2, -1, 3, 3, -1]), torch.zeros(7, dtype=torch.bool))
    aligned = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 1, 0]], dtype=torch.bool)
    coverage = cross_vocab.Coverage()
    loss = coverage.counting(lambda b: cross_vocab.muscle_loss_cross(hs, ho, hn, heads, labels,
                                                                     aligned, vmap))
    out = loss(None)
    with torch.no_grad():
        loss(None)  # a validation forward: not counted
    shares = cross_vocab.Coverage.shares(coverage.totals)
    # Label tokens: row 0 positions 0-4 (aligned: 0, 1, 3, 4), row 1 positions 0-2 (0, 2).
    assert out.tokens == 8 and out.aligned == 6 and shares["aligned"] == 6 / 8
    assert shares["mapped_mass"] == pytest.approx(out.mapped_mass / 6) and shares["mapped_mass"] < 1
    assert shares["followed_old"] == out.follow_old / 8
    assert shares["unaligned_asked_old"] == out.unaligned / 8


def test_logits_exist_one_chunk_at_a_time():
    """No head projects more than chunk_size positions at once: at most one chunk's [chunk, V_new]
    and [chunk, V_old] logits exist, never the batch's."""
    heads, (hs, _, hn), labels = _heads_and_states(4, batch=3, length=9)
    old_head = torch.nn.Linear(5, 9, dtype=torch.float64)
    ho = torch.randn(3, 9, 5, dtype=torch.float64)
    rows = []

    def recording(head):
        def project(h):
            rows.append(h.shape[0])
            return head(h)
        return project

    vmap = cross_vocab.VocabMap(torch.tensor([0, 1, 2, -1, 3, 3, -1, 5, -1]), torch.zeros(7, dtype=torch.bool))
    student = hs.clone().requires_grad_()
    out = cross_vocab.muscle_loss_cross(student, ho, hn, [recording(h) for h in (heads[0], old_head, heads[2])],
                                        labels, torch.ones(3, 9, dtype=torch.bool), vmap, chunk_size=5)
    out.loss.backward()
    assert out.tokens == 19 and max(rows) == 5 and sum(rows) == 3 * 19


@pytest.mark.parametrize("mask", sorted(muscle.MASKS_IGNORING_OLD))
def test_masks_said_to_ignore_the_old_model_do(mask):
    g = torch.Generator().manual_seed(5)
    student, new, old_a, old_b = (torch.randn(2, 6, 7, generator=g) for _ in range(4))
    labels = torch.randint(0, 7, (2, 6), generator=g)
    fn = muscle.get_mask(mask)
    assert torch.equal(fn(student, old_a, new, labels), fn(student, old_b, new, labels))
