"""lora.py: the LoRA formula, named adapters, merge, and PEFT's file format with peft as the oracle."""
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

import lora
import models


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 2 * d, bias=False)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.tanh(self.fc1(self.q_proj(x))))


class Toy(nn.Module):
    """Named linear layers in blocks plus an output head, like a tiny transformer."""

    def __init__(self, d: int = 6, vocab: int = 5, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.lm_head(x)


def randomize(model: nn.Module, name: str, seed: int) -> None:
    """Non-zero A and B, so the adapter changes outputs (B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_parameters(model, name).values():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


X = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- the layer

def test_forward_equals_plain_formula():
    base = nn.Linear(5, 7)
    layer = lora.LoRALinear(base)
    layer.add("a", lora.AdapterSpec(rank=3, alpha=4.5, dropout=0.0, targets=[]))
    layer.active = "a"
    a, b = torch.randn(3, 5), torch.randn(7, 3)
    with torch.no_grad():
        layer.lora_A["a"].weight.copy_(a)
        layer.lora_B["a"].weight.copy_(b)
    x = torch.randn(2, 5)
    expected = x @ base.weight.T + base.bias + 1.5 * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_new_adapter_is_a_no_op_with_peft_initialisation():
    model = Toy()
    before = outputs(model, X)
    lora.add_adapter(model, rank=4)
    layer = model.layers[0].q_proj
    assert torch.equal(outputs(model, X), before)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    # Kaiming-uniform with a=sqrt(5): bound = 1/sqrt(fan_in)
    a = layer.lora_A["default"].weight
    assert a.abs().max() <= 1 / math.sqrt(6) and a.std() > 0.1


def test_dropout_touches_only_the_lora_input():
    model = Toy()
    lora.add_adapter(model, rank=4, dropout=0.5)
    randomize(model, "default", seed=0)
    with lora.use_adapter(model, None):
        base = outputs(model, X)
    model.train()
    torch.manual_seed(0)
    train1, train2 = outputs(model, X), outputs(model, X)
    assert not torch.allclose(train1, train2)  # dropout is active on the LoRA branch
    with lora.use_adapter(model, None):
        assert torch.equal(outputs(model, X), base)  # ... and never on the base path


def test_wrapping_keeps_base_parameters_and_state_dict_keys():
    model = Toy()
    keys, weight = set(model.state_dict()), model.layers[1].fc2.weight
    lora.add_adapter(model, rank=2)
    assert isinstance(model.layers[1].fc2, lora.LoRALinear)
    assert model.layers[1].fc2.weight is weight
    assert {k for k in model.state_dict() if ".lora_" not in k} == keys


# ---------------------------------------------------------------- adapters on a model

def test_default_targets_are_block_linears_and_lm_head_only_when_named():
    model = Toy()
    lora.add_adapter(model, "all", rank=2)
    assert not isinstance(model.lm_head, lora.LoRALinear)
    assert len(lora.adapter_parameters(model, "all")) == 2 * 6
    lora.add_adapter(model, "head", rank=2, targets=["lm_head", "layers.0.fc1"])
    assert set(lora.adapter_parameters(model, "head")) == {
        "lm_head.lora_A.head.weight", "lm_head.lora_B.head.weight",
        "layers.0.fc1.lora_A.head.weight", "layers.0.fc1.lora_B.head.weight"}


def test_trainable_parameter_count_matches_formula():
    model = Toy(d=6)
    lora.add_adapter(model, rank=3, targets=["q_proj", "fc2"])
    lora.mark_trainable(model, "default")
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == 2 * (3 * (6 + 6) + 3 * (12 + 6))


def test_gradients_reach_only_the_active_adapter():
    model = Toy()
    lora.add_adapter(model, "frozen", rank=2, alpha=4)
    lora.add_adapter(model, "student", rank=2, alpha=4)
    randomize(model, "frozen", 0)
    randomize(model, "student", 1)
    lora.mark_trainable(model, "student")
    model(X).square().sum().backward()
    student = lora.adapter_parameters(model, "student")
    for name, p in model.named_parameters():
        if name in student:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_merge_then_unmerge_restores_weights():
    model = Toy()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lora.add_adapter(model, rank=4, alpha=8)
    randomize(model, "default", 0)
    unmerged = outputs(model, X)
    lora.merge_adapter(model, "default")
    lora.merge_adapter(model, "default")  # idempotent: never folded in twice
    assert not torch.equal(model.layers[0].q_proj.weight, original["layers.0.q_proj.weight"])
    torch.testing.assert_close(outputs(model, X), unmerged, rtol=0, atol=1e-5)  # not counted twice
    lora.unmerge_adapter(model, "default")
    for key, value in original.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6)
    torch.testing.assert_close(outputs(model, X), unmerged, rtol=0, atol=1e-6)


def test_cannot_switch_away_from_a_merged_adapter():
    model = Toy()
    lora.add_adapter(model, "a", rank=2)
    lora.add_adapter(model, "b", rank=2)
    lora.merge_adapter(model, "a")
    with pytest.raises(ValueError, match="'a' is merged"):
        lora.set_adapter(model, "b")
    with pytest.raises(ValueError, match="'b' is not merged"):
        lora.unmerge_adapter(model, "b")


def test_refuses_to_merge_into_a_tied_weight():
    model = Toy()
    model.layers[1].q_proj.weight = model.layers[0].q_proj.weight  # like lm_head tied to embeddings
    lora.add_adapter(model, rank=2, targets=["layers.0.q_proj"])
    with pytest.raises(ValueError, match=r"\['layers.0.q_proj'\] share their weight"):
        lora.merge_adapter(model, "default")


def test_switching_adapters_equals_loading_each_alone(tmp_path):
    model = Toy()
    bare = outputs(model, X)
    lora.add_adapter(model, "a", rank=2, targets=["q_proj"])
    lora.add_adapter(model, "b", rank=3)
    randomize(model, "a", 0)
    randomize(model, "b", 1)
    for name in ("a", "b"):
        lora.save_adapter(model, tmp_path / name, name)
    for name in ("a", "b", "a"):
        lora.set_adapter(model, name)
        alone = Toy()
        lora.load_adapter(alone, tmp_path / name)
        torch.testing.assert_close(outputs(model, X), outputs(alone, X), rtol=0, atol=0)
    lora.set_adapter(model, None)
    assert torch.equal(outputs(model, X), bare)


def test_use_adapter_restores_the_previous_adapter():
    model = Toy()
    lora.add_adapter(model, "a", rank=2)
    lora.add_adapter(model, "b", rank=2)
    assert lora.active_adapter(model) == "b"
    with lora.use_adapter(model, "a"):
        assert lora.active_adapter(model) == "a"
    assert lora.active_adapter(model) == "b"
    assert lora.adapter_names(model) == ["a", "b"]


def test_copy_adapter_is_equal_and_independent():
    model = Toy()
    lora.add_adapter(model, "task", rank=2)
    randomize(model, "task", 0)
    task_out = outputs(model, X)
    lora.copy_adapter(model, "task", "compat")
    assert lora.active_adapter(model) == "compat"
    assert torch.equal(outputs(model, X), task_out)
    randomize(model, "compat", 1)
    with lora.use_adapter(model, "task"):
        assert torch.equal(outputs(model, X), task_out)


# ---------------------------------------------------------------- a bfloat16 base

def test_adapters_stay_float32_on_a_bf16_base_and_load_back_bit_identical(tmp_path):
    """Saved float32 weights (here random: most are not bfloat16 numbers) come back bit for bit
    on a bf16 base, and a copy equals its source exactly, as stage 3's compat adapter equals A2."""
    model = Toy().to(torch.bfloat16)
    lora.add_adapter(model, "task", rank=4, alpha=8)
    randomize(model, "task", 0)
    weights = {k: p.detach().clone() for k, p in lora.adapter_parameters(model, "task").items()}
    assert {p.dtype for p in weights.values()} == {torch.float32}
    assert any(not torch.equal(p, p.bfloat16().float()) for p in weights.values())
    assert model.layers[0].q_proj.weight.dtype == torch.bfloat16
    lora.save_adapter(model, tmp_path, "task")
    alone = Toy().to(torch.bfloat16)
    lora.load_adapter(alone, tmp_path, "task")
    lora.copy_adapter(alone, "task", "compat")
    for adapter in ("task", "compat"):
        loaded = lora.adapter_parameters(alone, adapter)
        for k, p in weights.items():
            assert torch.equal(loaded[k.replace(".task.", f".{adapter}.")], p), (adapter, k)
    x = X.bfloat16()
    assert outputs(alone, x).dtype == torch.bfloat16
    assert torch.equal(outputs(alone, x), outputs(model, x))


def test_lora_branch_computes_in_the_input_dtype_with_float32_gradients():
    """On a bf16 base the branch is x_bf16 A_bf16^T B_bf16^T (as under FSDP's bf16 policy), and
    the gradients reach the float32 weights in float32."""
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(6, 5).to(torch.bfloat16))
    layer.add("a", lora.AdapterSpec(rank=3, alpha=6, dropout=0.0, targets=["x"]))
    layer.active = "a"
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
    x = X.bfloat16()
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    expected = (torch.nn.functional.linear(x, layer.weight, layer.bias)
                + (x @ a.bfloat16().T @ b.bfloat16().T) * 2.0)
    out = layer(x)
    assert torch.equal(out, expected)
    out.float().sum().backward()
    assert a.grad.dtype == b.grad.dtype == torch.float32 and a.grad.abs().sum() > 0


def test_merge_then_unmerge_on_a_bf16_base():
    model = Toy().to(torch.bfloat16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lora.add_adapter(model, rank=4, alpha=8)
    randomize(model, "default", 0)
    x = X.bfloat16()
    unmerged = outputs(model, x)
    lora.merge_adapter(model, "default")
    assert model.layers[0].q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(outputs(model, x), unmerged, rtol=0.05, atol=0.05)  # bf16 rounding
    lora.unmerge_adapter(model, "default")
    for key, value in original.items():  # within the rounding of bf16 weights near 1 (2^-8)
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=2 ** -7)
    assert lora.adapter_parameters(model, "default")["layers.0.q_proj.lora_A.default.weight"].dtype == torch.float32


def test_user_errors_have_clear_messages(tmp_path):
    model = Toy()
    with pytest.raises(ValueError, match=r"\['o_proj'\] match no linear layer.*'fc1', 'fc2', 'lm_head', 'q_proj'"):
        lora.add_adapter(model, targets=["q_proj", "o_proj"])
    lora.add_adapter(model, rank=2)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        lora.add_adapter(model, rank=2)
    with pytest.raises(ValueError, match=r"no adapter named 'x'.*\['default'\]"):
        lora.set_adapter(model, "x")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.load_adapter(model, tmp_path, "other")


def test_loading_into_a_base_of_another_shape_names_key_and_shapes(tmp_path):
    model = Toy(d=6)
    lora.add_adapter(model, rank=2)
    lora.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match=r"layers\.0\.fc1\.lora_A\.weight has shape \(2, 6\) "
                                         r"but this model needs \(2, 8\)"):
        lora.load_adapter(Toy(d=8), tmp_path)


# ---------------------------------------------------------------- files

def test_saved_files_are_peft_format(tmp_path):
    model = Toy()
    lora.add_adapter(model, rank=4, alpha=8, targets=["q_proj", "fc1"])
    lora.save_adapter(model, tmp_path, base_model_name_or_path="toy")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "target_modules",
                                    "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "fc1"], "base_model_name_or_path": "toy"}
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert "base_model.model.layers.1.fc1.lora_B.weight" in lora.adapter_state_dict(model, "default")


@pytest.mark.parametrize("spelling", ["in_memory_keys", "legacy_bin"])
def test_loads_other_peft_spellings(tmp_path, spelling):
    """PEFT's in-memory key names (`lora_A.default.weight`) and older PEFT's adapter_model.bin."""
    model = Toy()
    lora.add_adapter(model, rank=2, alpha=4)
    randomize(model, "default", 0)
    lora.save_adapter(model, tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    if spelling == "in_memory_keys":
        state = {k.replace(".weight", ".default.weight"): v for k, v in state.items()}
        save_file(state, tmp_path / "adapter_model.safetensors")
    else:
        torch.save(state, tmp_path / "adapter_model.bin")
        os.remove(tmp_path / "adapter_model.safetensors")
    alone = Toy()
    lora.load_adapter(alone, tmp_path)
    assert torch.equal(outputs(alone, X), outputs(model, X))


def test_rejects_peft_features_it_does_not_implement(tmp_path):
    model = Toy()
    lora.add_adapter(model, rank=2)
    lora.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="unsupported settings {'use_dora': True}"):
        lora.load_adapter(Toy(), tmp_path)


# ---------------------------------------------------------------- parity with PEFT on tiny Llama / Phi

@pytest.fixture(scope="module", params=["llama", "phi"])
def checkpoint(request, tmp_path_factory):
    from fake_hub import save_checkpoint, tiny_hf_model  # imports transformers: not in FSDP workers

    return save_checkpoint(tiny_hf_model(request.param), tmp_path_factory.mktemp(request.param))


IDS = torch.randint(0, 160, (2, 9), generator=torch.Generator().manual_seed(0))


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_our_adapter_loads_in_peft(checkpoint, tmp_path):
    import transformers
    from peft import PeftModel

    ours = models.load_model(checkpoint)
    lora.add_adapter(ours, rank=4, alpha=12)
    randomize(ours, "default", 0)
    lora.save_adapter(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    bare = hf_logits(hf)
    peft_model = PeftModel.from_pretrained(hf, tmp_path).eval()
    assert (hf_logits(peft_model) - outputs(ours, IDS)).abs().max() < 1e-5
    assert (hf_logits(peft_model) - bare).abs().max() > 0.1  # the adapter matters


def test_peft_adapter_loads_here(checkpoint, tmp_path):
    import transformers
    from peft import LoraConfig, get_peft_model

    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    bare = hf_logits(hf)
    config = LoraConfig(r=4, lora_alpha=6, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf, config).eval()
    peft_model.save_pretrained(tmp_path)
    ours = models.load_model(checkpoint)
    lora.load_adapter(ours, tmp_path)
    assert (hf_logits(peft_model) - outputs(ours, IDS)).abs().max() < 1e-5
    assert (hf_logits(peft_model) - bare).abs().max() > 0.1  # the adapter matters
    # our default targets are PEFT's "all-linear": the same trainable parameter count
    fresh = models.load_model(checkpoint)
    lora.add_adapter(fresh, rank=4)
    count = sum(p.numel() for p in lora.adapter_parameters(fresh, "default").values())
    assert count == peft_model.get_nb_trainable_parameters()[0]


# ---------------------------------------------------------------- FSDP2 (CPU, gloo, 2 processes)

FSDP_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _sharded_save(rank: int, world: int, port: int, out: str) -> None:
    """For a float32 and a bfloat16 base: shard, run a backward, save (into out/<dtype>)."""
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    from torch.distributed.fsdp import fully_shard

    for dtype_name, dtype in FSDP_DTYPES.items():
        model = Toy().to(dtype)
        lora.add_adapter(model, rank=2)
        randomize(model, "default", 0)
        lora.mark_trainable(model, "default")
        expected = lora.adapter_state_dict(model, "default")
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        param = model.layers[0].q_proj.lora_A["default"].weight
        assert type(param).__name__ == "DTensor" and param.to_local().shape == (1, 6)
        assert param.dtype == torch.float32  # float32 adapters shard with a bf16 base in one unit
        model(X.to(dtype)).float().sum().backward()  # frozen and trainable parameters shard together
        assert param.grad.dtype == torch.float32
        lora.save_adapter(model, os.path.join(out, dtype_name))
        got = lora.adapter_state_dict(model, "default")
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch.distributed.fsdp
def test_save_under_fsdp2_gathers_shards_and_writes_once(tmp_path):
    # The rendezvous store lives in this process, as torchrun's agent hosts it. Hosted by rank 0, it
    # could vanish while rank 1 was still tearing down its process group: rank 1 then aborted
    # ("terminate called without an active exception", about 1 run in 20).
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    mp.spawn(_sharded_save, args=(2, store.port, str(tmp_path)), nprocs=2)
    for dtype_name, dtype in FSDP_DTYPES.items():
        alone = Toy().to(dtype)
        lora.load_adapter(alone, tmp_path / dtype_name)
        model = Toy().to(dtype)
        lora.add_adapter(model, rank=2)
        randomize(model, "default", 0)
        torch.testing.assert_close(outputs(alone, X.to(dtype)), outputs(model, X.to(dtype)), rtol=0, atol=0)
        assert sorted(os.listdir(tmp_path / dtype_name)) == ["adapter_config.json", "adapter_model.safetensors"]
