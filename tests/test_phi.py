"""phi.py against transformers' PhiForCausalLM on tiny random checkpoints (float32 logits)."""
import json

import pytest
import torch
from fake_hub import (check_kv_cache_equals_full_forward, check_left_padded_generation_equals_alone,
                      check_padded_batch_equals_alone, check_right_padding_takes_the_causal_path, max_logit_diff, random_ids, save_checkpoint, tiny_hf_model)
from safetensors.torch import save_file

import models
import phi

CONFIGS = {
    "phi1_5_like": dict(partial_rotary_factor=0.5),
    "phi2_like": dict(partial_rotary_factor=0.4, resid_pdrop=0.1),
    "qk_layernorm": dict(partial_rotary_factor=0.5, qk_layernorm=True),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its *sharded* save_pretrained checkpoint)."""
    hf = tiny_hf_model("phi", **CONFIGS[request.param])
    ckpt = save_checkpoint(hf, tmp_path_factory.mktemp(request.param), sharded=True)
    assert (ckpt / "model.safetensors.index.json").is_file()
    return hf, models.load_model(ckpt)


def test_logits_match_transformers(pair):
    hf, ours = pair
    assert isinstance(ours, phi.PhiForCausalLM)
    assert max_logit_diff(hf, ours) < 1e-4


def test_state_dict_keys_equal_transformers(pair):
    hf, ours = pair
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert "lm_head.bias" in ours.state_dict() and "model.layers.0.self_attn.dense.bias" in ours.state_dict()


def test_partial_rotary_dims_read_from_config(pair):
    hf, ours = pair
    head_dim = 64 // 4
    assert ours.model.rotary_emb.inv_freq.numel() * 2 == int(head_dim * hf.config.rope_parameters["partial_rotary_factor"])


def test_kv_cache_token_by_token_equals_full_forward(pair):
    check_kv_cache_equals_full_forward(pair[1])


def test_padded_batch_equals_each_sequence_alone(pair):
    check_padded_batch_equals_alone(pair[1])


def test_left_padded_generation_with_cache_equals_alone(pair):
    check_left_padded_generation_equals_alone(pair[1])


def test_right_padding_takes_the_causal_path_with_the_masked_paths_numbers(pair, monkeypatch):
    check_right_padding_takes_the_causal_path(pair[1], monkeypatch)


def test_resid_dropout_only_in_train_mode(tmp_path):
    """Phi-2 keeps resid_pdrop=0.1: HF applies it in train mode (transformers#28488), never in eval."""
    ours = models.load_model(save_checkpoint(tiny_hf_model("phi", resid_pdrop=0.1), tmp_path))
    ids = random_ids((1, 8), seed=7)
    with torch.no_grad():
        assert torch.equal(ours(ids), ours(ids))
        ours.train()
        torch.manual_seed(0)
        a = ours(ids)
        torch.manual_seed(1)
        assert not torch.allclose(a, ours(ids))


def test_legacy_config_keys(tmp_path):
    """Hub config.json files carry top-level partial_rotary_factor and rope_theta (no rope_parameters)."""
    hf = tiny_hf_model("phi", partial_rotary_factor=0.4)
    ckpt = save_checkpoint(hf, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg.update(partial_rotary_factor=rope["partial_rotary_factor"], rope_theta=rope["rope_theta"])
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert max_logit_diff(hf, models.load_model(ckpt)) < 1e-4


def test_old_mixformer_checkpoint_fails_loudly(tmp_path):
    """Pre-2024 microsoft/phi-* revisions used MixFormer keys (layers.N.mixer.Wqkv): say so."""
    ckpt = save_checkpoint(tiny_hf_model("phi"), tmp_path)
    save_file({"layers.1.mixer.Wqkv.weight": torch.zeros(3, 3)}, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="outdated Phi checkpoint"):
        models.load_model(ckpt)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "phi-msft"}))
    with pytest.raises(ValueError, match="outdated Phi checkpoint"):
        models.load_model(ckpt)


def test_partial_rotary_factor_defaults_to_phi1_style_half():
    cfg = phi.PhiConfig.from_hf({"vocab_size": 10, "hidden_size": 64, "intermediate_size": 8,
                                 "num_hidden_layers": 1, "num_attention_heads": 4})
    assert (cfg.rotary_dim, cfg.rope.theta) == (8, 10000.0)
