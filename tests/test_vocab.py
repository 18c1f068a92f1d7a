"""The vocabulary check of train.py on Llama-style tokenizers in both of the formats the hub
repositories ship: a sentencepiece tokenizer.model (Vicuna) and the tokenizer.json converted from
it (Llama 1/2), with transformers' converter as the oracle of the conversion."""
import json
import shutil

import pytest

import tokenizer
import train
from fake_hub import write_tiny_llama

VOCAB = 500
SPM_CONFIG = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True}


def train_sentencepiece(directory, lines):
    """A Llama-style tokenizer.model: BPE with byte fallback, split digits, <unk> <s> </s> at 0-2."""
    import sentencepiece as spm

    directory.mkdir(parents=True)
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=VOCAB,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps(SPM_CONFIG))
    return directory


def lines_of(path, field, n=2000):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[field] for line, _ in zip(f, range(n))]


@pytest.fixture(scope="module")
def checkpoints(data_dir, tmp_path_factory):
    """Three tiny Llamas: "spm" ships tokenizer.model, "json" the tokenizer.json that transformers
    converts from it, "other" a tokenizer.model of the same size trained on other text."""
    pytest.importorskip("google.protobuf", reason="transformers converts tokenizer.model through protobuf")
    import transformers

    root = tmp_path_factory.mktemp("vocab")
    spm_dir = train_sentencepiece(root / "spm", lines_of(data_dir / "piqa" / "train.jsonl", "goal"))
    transformers.AutoTokenizer.from_pretrained(str(spm_dir)).save_pretrained(str(root / "json"))
    assert not (root / "json" / "tokenizer.model").exists()
    other = train_sentencepiece(root / "other", lines_of(data_dir / "gsm8k" / "train.jsonl", "question"))
    for seed, d in enumerate((spm_dir, root / "json", other)):
        write_tiny_llama(d, seed, VOCAB)
    return {name: root / name for name in ("spm", "json", "other")}


def stage1_flags(old, new, data_dir, out):
    """One optimizer step of stage 1: the vocabulary check has passed once it starts."""
    return ["--old", str(old), "--new", str(new), "--task", "piqa", "--data-dir", str(data_dir),
            "--out", str(out), "--stage", "1", "--limit-train", "10", "--epochs", "1",
            "--max-steps", "1", "--batch-size", "4", "--grad-accum", "1", "--rank", "2",
            "--alpha", "4", "--max-len", "32", "--warmup-steps", "1", "--chunk-size", "16"]


def test_the_two_formats_hold_one_vocabulary_that_decodes_differently(checkpoints):
    spm_tok, json_tok = (tokenizer.load_tokenizer_dir(checkpoints[k]) for k in ("spm", "json"))
    assert type(spm_tok.backend).__name__ == "_SentencePiece"
    assert type(json_tok.backend).__name__ == "_HFTokenizers"
    pieces = spm_tok.vocabulary()
    assert json_tok.vocabulary() == pieces and len(pieces) == VOCAB
    assert pieces[:4] == ["<unk>", "<s>", "</s>", "<0x00>"] and "<0x0A>" in pieces
    # Why pieces and not decoded ids: the two libraries decode single ids differently.
    assert (spm_tok.decode([0]), json_tok.decode([0])) == (" ⁇ ", "")


@pytest.mark.parametrize("old, new", [("spm", "json"), ("json", "spm")])
def test_tokenizer_model_and_tokenizer_json_pair_in_both_orders(checkpoints, data_dir, tmp_path,
                                                                 old, new, capsys):
    out = tmp_path / "run"
    assert train.main(stage1_flags(checkpoints[old], checkpoints[new], data_dir, out)) == 0
    assert (out / "stage1_task_old" / "DONE").is_file()
    assert "error" not in capsys.readouterr().err


def test_a_different_vocabulary_is_refused_naming_the_first_differing_pieces(checkpoints, data_dir,
                                                                            tmp_path, capsys):
    import sentencepiece as spm

    a, b = (spm.SentencePieceProcessor(model_file=str(checkpoints[k] / "tokenizer.model"))
            for k in ("spm", "other"))
    differing = [i for i in range(VOCAB) if a.id_to_piece(i) != b.id_to_piece(i)]
    out = tmp_path / "run"
    assert train.main(stage1_flags(checkpoints["json"], checkpoints["other"], data_dir, out)) == 2
    err = capsys.readouterr().err
    first = f"id {differing[0]}: {a.id_to_piece(differing[0])!r} vs {b.id_to_piece(differing[0])!r}"
    assert err.startswith("error: ") and err.count("\n") == 1
    assert f"tokenizer sizes {VOCAB} vs {VOCAB}; first differing pieces: {first}; id {differing[1]}" in err
    assert not out.exists()


def test_a_tokenizer_larger_than_its_config_vocab_or_unreadable_is_one_error_line(checkpoints, data_dir,
                                                                                 tmp_path, capsys):
    small = tmp_path / "small"
    shutil.copytree(checkpoints["spm"], small)
    write_tiny_llama(small, 0, VOCAB - 100)
    out = tmp_path / "run"
    assert train.main(stage1_flags(small, checkpoints["json"], data_dir, out)) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {small / 'tokenizer.model'} has {VOCAB} tokens but {small / 'config.json'} "
                   f"has vocab_size {VOCAB - 100}: ids from {VOCAB - 100} on have no embedding, so the "
                   f"tokenizer files belong to another model; copy those of the checkpoint's own repo\n")
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["spm"], broken)
    data = (broken / "tokenizer.model").read_bytes()
    (broken / "tokenizer.model").write_bytes(data[:len(data) // 3])  # a truncated download
    assert train.main(stage1_flags(checkpoints["json"], broken, data_dir, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read {broken / 'tokenizer.model'} with sentencepiece (")
    assert err.count("\n") == 1 and "copy it again from the checkpoint's original repo" in err
    assert not out.exists()
