"""llama.py against transformers' LlamaForCausalLM on tiny random checkpoints (float32 logits)."""
import pytest
import torch
from fake_hub import (LLAMA3_ROPE, check_kv_cache_equals_full_forward, check_left_padded_generation_equals_alone,
                      check_padded_batch_equals_alone, check_right_padding_takes_the_causal_path, max_logit_diff, save_checkpoint, tiny_hf_model)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import llama
import models

CONFIGS = {
    "mha": {},
    "gqa_llama3_rope": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                            rms_norm_eps=1e-5),
    "tied": dict(tie_word_embeddings=True),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),  # vicuna-7b-v1.5-16k
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its save_pretrained checkpoint)."""
    hf = tiny_hf_model("llama", **CONFIGS[request.param])
    ckpt = save_checkpoint(hf, tmp_path_factory.mktemp(request.param))
    return hf, models.load_model(ckpt)


def test_logits_match_transformers(pair):
    hf, ours = pair
    assert isinstance(ours, llama.LlamaForCausalLM)
    assert max_logit_diff(hf, ours) < 1e-4


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
    check_kv_cache_equals_full_forward(pair[1])


def test_padded_batch_equals_each_sequence_alone(pair):
    check_padded_batch_equals_alone(pair[1])


def test_left_padded_generation_with_cache_equals_alone(pair):
    check_left_padded_generation_equals_alone(pair[1])


def test_right_padding_takes_the_causal_path_with_the_masked_paths_numbers(pair, monkeypatch):
    check_right_padding_takes_the_causal_path(pair[1], monkeypatch)


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
