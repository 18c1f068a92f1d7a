"""A real pretrained checkpoint (SmolLM2-135M-Instruct: Llama with GQA 9/3, tied embeddings,
RoPE theta 1e5, byte-level BPE that splits digits) against transformers, on CPU."""

import pytest
import torch

import data
import eval as evaluation
import models

transformers = pytest.importorskip("transformers")


@pytest.fixture
def two_threads():
    """A 135M model runs about twice as fast on CI's two cores as on one (the suite pins one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return models.load_model(smollm2_dir), models.load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    return (transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval(),
            transformers.AutoTokenizer.from_pretrained(str(smollm2_dir)))


def gsm8k_prompts(data_dir, n):
    return [it.prompt for it in data.load_task("gsm8k", "test", data_dir)[:n]]


def test_logits_equal_transformers_on_real_text(ours, hf, data_dir, two_threads):
    (model, tok), (hf_model, hf_tok) = ours, hf
    piqa = data.load_task("piqa", "validation", data_dir)[0]
    texts = [piqa.context + " " + piqa.choices[piqa.gold], gsm8k_prompts(data_dir, 1)[0]]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf_tok(text)["input_ids"]  # no BOS: SmolLM2 adds none
        x = torch.tensor([ids])
        with torch.no_grad():
            diff = (model(x) - hf_model(x).logits).abs().max().item()
        assert diff < 1e-4, (text[:40], diff)


def test_greedy_generation_equals_transformers_generate(ours, hf, data_dir, two_threads):
    (model, tok), (hf_model, _) = ours, hf
    prompts = [tok.encode(p) for p in gsm8k_prompts(data_dir, 3)]
    got = evaluation.generate_ids(model, tok, prompts, max_new_tokens=32, batch_size=3)
    for prompt, tokens in zip(prompts, got):
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    do_sample=False, max_new_tokens=32, eos_token_id=tok.eos_id,
                                    pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
        expected = out[:out.index(tok.eos_id)] if tok.eos_id in out else out
        assert tokens == expected
    assert all(len(t) > 8 for t in got)  # real continuations, not an immediate EOS
