"""tokenizer.py against transformers' AutoTokenizer on tokenizers built in the test (BOS included)."""
import json

import pytest
import transformers

import tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Question: How many clips did Natalia sell altogether in April and May? Answer: 72",
    "Summarize the dialogue: Amanda: I baked cookies. Do you want some? Jerry: Sure!",
    "Tokenizers split text into pieces; models predict the next piece.",
] * 20
TEXTS = ["Hello world!", "  leading spaces and  double  spaces", "Answer: 18 + 24 = 42.", "naïve café ☕",
         "Jerry: Sure!\nAmanda: ok", ""]


def _write_json(path, obj):
    path.write_text(json.dumps(obj))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A GPT-2 style byte-level BPE tokenizer.json (Phi's kind): no BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d = tmp_path_factory.mktemp("bpe")
    tok.save(str(d / "tokenizer.json"))
    _write_json(d / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                              "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    return d


@pytest.fixture(scope="module")
def bos_template_dir(bpe_dir, tmp_path_factory):
    """Llama 3 style: BOS only declared by tokenizer.json's TemplateProcessing post-processor."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    tok.add_special_tokens(["<|begin_of_text|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)])
    d = tmp_path_factory.mktemp("llama3")
    tok.save(str(d / "tokenizer.json"))
    _write_json(d / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                              "bos_token": "<|begin_of_text|>", "eos_token": "<|endoftext|>"})
    return d


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A sentencepiece tokenizer.model trained with Llama's settings (BPE, byte fallback, split digits,
    identity normalisation keeping repeated spaces) and Llama's tokenizer_config (add_bos_token: true)."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    (d / "corpus.txt").unlink()
    (d / "tokenizer.vocab").unlink()
    _write_json(d / "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                              "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                                              "unk_token": "<unk>", "legacy": True})
    return d


@pytest.mark.parametrize("fixture, add_bos, bos_id", [
    ("bpe_dir", False, 0), ("bos_template_dir", True, 300), ("spm_dir", True, 1)])
def test_encode_decode_equal_transformers(request, fixture, add_bos, bos_id):
    if fixture == "spm_dir":  # transformers converts tokenizer.model through protobuf
        pytest.importorskip("google.protobuf", reason="protobuf (requirements-test.txt) reads tokenizer.model")
    d = request.getfixturevalue(fixture)
    ours, hf = tokenizer.load_tokenizer_dir(d), transformers.AutoTokenizer.from_pretrained(str(d))
    assert (ours.add_bos, ours.bos_id) == (add_bos, bos_id)
    assert ours.bos_id == hf.bos_token_id and ours.eos_id == hf.eos_token_id
    for text in TEXTS:
        if fixture == "spm_dir" and text.startswith(" "):
            # transformers 5 converts tokenizer.model to a Metaspace pre-tokenizer that skips the "▁" prefix
            # when the text already starts with a space; sentencepiece (how Llama was trained) and
            # Llama-2's published tokenizer.json (a Prepend normalizer) always add it, as we do.
            continue
        ids = ours.encode(text)
        assert ids == hf(text)["input_ids"], text
        assert ours.encode(text, add_bos=False) == hf(text, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.encode("x", add_bos=True)[0] == bos_id


def test_sentencepiece_round_trip_and_pad_falls_back_to_eos(spm_dir):
    ours = tokenizer.load_tokenizer_dir(spm_dir)
    assert ours.decode(ours.encode("Hello world! 42")) == "Hello world! 42"
    assert ours.pad_id == ours.eos_id == 2 and ours.vocab_size == 400


def test_missing_tokenizer_files_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer \\(tokenizer.json or tokenizer.model\\)"):
        tokenizer.load_tokenizer_dir(tmp_path)
