"""llama.py against transformers' LlamaForCausalLM on tiny random checkpoints (float32 logits)."""
import pytest
import torch
from fake_hub import LLAMA3_ROPE, save_checkpoint, tiny_hf_model
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import llama
import models

CONFIGS = {
    "mha": {},
    "gqa_llama3_rope": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                            rms_norm_eps=1e-5),
    "tied": dict(tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its save_pretrained checkpoint)."""
    hf = tiny_hf_model("llama", **CONFIGS[request.param])
    ckpt = save_checkpoint(hf, tmp_path_factory.mktemp(request.param))
    return hf, models.load_model(ckpt)


def test_logits_match_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, 160, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-4
    assert isinstance(ours, llama.LlamaForCausalLM) and ours(ids).dtype == torch.float32


def test_state_dict_keys_equal_transformers(pair):
    hf, ours = pair
    assert set(ours.state_dict()) == set(hf.state_dict())


def test_hidden_states_and_lm_head_compose_to_logits(pair):
    _, ours = pair
    ids = torch.randint(0, 160, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours.lm_head(ours.hidden_states(ids)), ours(ids), rtol=0, atol=0)


def test_tied_embeddings_share_one_tensor(tmp_path):
    ours = models.load_model(save_checkpoint(tiny_hf_model("llama", tie_word_embeddings=True), tmp_path))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_kv_cache_token_by_token_equals_full_forward(pair):
    _, ours = pair
    ids = torch.randint(0, 160, (2, 10), generator=torch.Generator().manual_seed(2))
    cache = ours.new_cache(batch_size=2, max_len=16)
    with torch.no_grad():
        full = ours(ids)
        prefill = ours(ids[:, :4], cache=cache)  # a prompt, then one token at a time
        steps = [ours(ids[:, t:t + 1], cache=cache) for t in range(4, 10)]
    assert cache.length == 10
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), full, rtol=0, atol=1e-5)


def test_padded_batch_equals_each_sequence_alone(pair):
    """Right padding (training/scoring) and left padding (generation), with and without a cache."""
    _, ours = pair
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 160, (n,), generator=gen) for n in (9, 5)]
    alone = [ours(s[None])[0] for s in seqs]
    for side in ("right", "left"):
        ids = torch.zeros(2, 9, dtype=torch.long)
        mask = torch.zeros(2, 9, dtype=torch.long)
        for i, s in enumerate(seqs):
            span = slice(0, len(s)) if side == "right" else slice(9 - len(s), 9)
            ids[i, span], mask[i, span] = s, 1
        with torch.no_grad():
            logits = ours(ids, attention_mask=mask)
        assert not logits.isnan().any()
        for i, s in enumerate(seqs):
            torch.testing.assert_close(logits[i][mask[i].bool()], alone[i], rtol=0, atol=1e-5)


def test_left_padded_generation_with_cache_equals_alone(pair):
    _, ours = pair
    gen = torch.Generator().manual_seed(4)
    short, long_ = torch.randint(0, 160, (3,), generator=gen), torch.randint(0, 160, (6,), generator=gen)
    nxt = torch.randint(0, 160, (2, 2), generator=gen)
    ids = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), short]), long_])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    cache = ours.new_cache(2, 8)
    with torch.no_grad():
        ours(ids, attention_mask=mask, cache=cache)
        for t in range(2):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            step = ours(nxt[:, t:t + 1], attention_mask=mask, cache=cache)[:, 0]
        for i, prompt in enumerate((short, long_)):
            expected = ours(torch.cat([prompt, nxt[i]])[None])[0, -1]
            torch.testing.assert_close(step[i], expected, rtol=0, atol=1e-5)


def test_llama3_inv_freq_equals_transformers():
    """Llama 3.1's real settings (head_dim 128, orig 8192) cover kept, blended and divided frequencies."""
    import transformers

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                                   rope_scaling=scaling, max_position_embeddings=131072)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    hf_dict = {"rope_theta": 500000.0, "rope_scaling": {**scaling, "type": "llama3"}}
    ours = llama.rope_inv_freq(128, llama.rope_settings(hf_dict))
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    base = llama.rope_inv_freq(128, llama.RopeSettings(theta=500000.0))
    assert (ours == base).any() and (ours == base / 8).any() and ((ours != base) & (ours != base / 8)).any()


@pytest.mark.parametrize("hf", [
    {"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}},
    {"rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    {"rope_parameters": {"rope_theta": 5e5, "rope_type": "linear", "factor": 4.0}},
])
def test_rope_settings_accept_all_three_spellings(hf):
    assert llama.rope_settings(hf) == llama.RopeSettings(5e5, "linear", {"factor": 4.0}, 1.0)


def test_unsupported_rope_type_is_a_clear_error():
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        llama.rope_settings({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def test_kv_cache_overflow_is_a_clear_error(pair):
    _, ours = pair
    cache = ours.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache is full"):
        ours(torch.zeros(1, 5, dtype=torch.long), cache=cache)
