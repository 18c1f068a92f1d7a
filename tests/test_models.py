"""models.py: registry, hub downloads (against a local fake hub), dtypes and the errors a user can cause."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub, max_logit_diff, save_checkpoint, tiny_hf_model, use_fake_hub, write_word_tokenizer

import models

ROOT = Path(__file__).resolve().parent.parent

NEEDED = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with FakeHub() as fake:
        use_fake_hub(monkeypatch, fake, tmp_path / "hf_home")
        yield fake


@pytest.fixture(scope="module")
def hf_llama():
    return tiny_hf_model("llama", num_key_value_heads=2)


@pytest.fixture
def llama_dir(hf_llama, tmp_path):
    d = save_checkpoint(hf_llama, tmp_path / "ckpt")
    write_word_tokenizer(d, add_bos=True)
    return d


def test_hub_repo_fetches_only_needed_files_and_loads(hub, llama_dir, hf_llama):
    (llama_dir / "flax_model.msgpack").write_bytes(b"x" * 100)  # files a repo may carry that we must skip
    torch.save(hf_llama.state_dict(), llama_dir / "pytorch_model.bin")
    (llama_dir / "original").mkdir()
    (llama_dir / "original" / "consolidated.00.pth").write_bytes(b"x")
    hub.add_repo("org/tiny-llama", llama_dir)
    model = models.load_model("org/tiny-llama")
    assert hub.fetched("org/tiny-llama") == NEEDED
    assert max_logit_diff(hf_llama, model) < 1e-4
    tok = models.load_tokenizer("org/tiny-llama")
    assert tok.encode("hello world") == [1, 3, 4] and hub.fetched("org/tiny-llama") == NEEDED


def test_hub_repo_with_only_bin_weights(hub, llama_dir, hf_llama):
    """Some repos (e.g. lmsys/vicuna-7b-v1.3) ship only .bin: read with torch.load(weights_only=True)."""
    (llama_dir / "model.safetensors").unlink()
    torch.save(hf_llama.state_dict(), llama_dir / "pytorch_model.bin")
    hub.add_repo("org/bin-only", llama_dir)
    model = models.load_model("org/bin-only")
    assert hub.fetched("org/bin-only") == NEEDED - {"model.safetensors"} | {"pytorch_model.bin"}
    assert max_logit_diff(hf_llama, model) < 1e-4


PINNED = "0123456789abcdef0123456789abcdef01234567"


def test_a_pinned_repo_is_fetched_at_its_commit(hub, llama_dir, hf_llama, monkeypatch):
    monkeypatch.setitem(models.PINS, "org/pinned", models.Pin(PINNED, "a test"))
    hub.add_repo("org/pinned", llama_dir, commit=PINNED)
    model = models.load_model("org/pinned")
    assert models.download("org/pinned").name == PINNED  # the cache's snapshots/<commit>
    assert {rev for repo, rev in hub.revisions if repo == "org/pinned"} == {PINNED}  # never main
    assert hub.fetched("org/pinned") == NEEDED and max_logit_diff(hf_llama, model) < 1e-4


def test_a_pin_the_hub_lacks_is_one_error_naming_repo_and_commit(hub, llama_dir, monkeypatch):
    monkeypatch.setitem(models.PINS, "org/moved", models.Pin(PINNED, "a test"))
    hub.add_repo("org/moved", llama_dir)  # its only commit is another one
    with pytest.raises(ValueError, match=f"hub repo 'org/moved' has no commit {PINNED} "
                                         r"\(its pin in models.PINS\): download the repo yourself"):
        models.load_model("org/moved")
    assert hub.downloads == []


@pytest.mark.parametrize("status", [401, 403])
def test_gated_registry_model_says_how_to_log_in(hub, llama_dir, status):
    hub.add_repo(models.REGISTRY["llama2"], llama_dir, gated_status=status)
    with pytest.raises(PermissionError, match="hf auth login.*HF_TOKEN") as err:
        models.load_model("llama2")
    assert "accept its licence on https://huggingface.co/meta-llama/Llama-2-7b-hf" in str(err.value)
    assert hub.downloads == []


def test_registry_names_map_to_paper_models():
    assert {"llama1", "llama2", "llama3", "vicuna1.3", "vicuna1.5", "phi1", "phi1.5", "phi2"} <= set(models.REGISTRY)
    assert models.REGISTRY["phi1.5"] == "microsoft/phi-1_5"


def test_registered_builders_resolve_and_are_listed(monkeypatch, llama_dir):
    monkeypatch.setattr(models, "BUILDERS", {})
    built = []
    models.register_builder("toy-v1", lambda name: built.append(name) or llama_dir)
    assert models.resolve("toy-v1") == llama_dir and built == ["toy-v1"]
    with pytest.raises(ValueError, match="toy-v1"):
        models.resolve("no-such-model")
    with pytest.raises(ValueError, match="already registered"):
        models.register_builder("toy-v1", lambda name: llama_dir)
    with pytest.raises(ValueError, match="already registered"):
        models.register_builder("llama2", lambda name: llama_dir)


def test_the_library_modules_do_not_load_toy():
    """toy.py is a client of data's and models' registries: only the entry points import it."""
    code = "import data, models, muscle, lora, trainer; import sys; print('toy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]


def test_default_dtype_is_float32_and_bfloat16_on_request(llama_dir):
    fp32 = models.load_model(llama_dir)
    bf16 = models.load_model(llama_dir, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 2, 3]])
    assert {p.dtype for p in fp32.parameters()} == {torch.float32} and fp32(ids).dtype == torch.float32
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16} and bf16(ids).dtype == torch.bfloat16
    assert not any(t.is_meta for t in [*bf16.parameters(), *bf16.buffers()]) and not bf16.training


def test_unknown_name_lists_the_registry():
    with pytest.raises(ValueError, match="unknown model 'llama9'.*llama1, llama2, llama3, phi1, phi1.5, phi2"):
        models.load_model("llama9")


def test_directory_without_config_or_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="is empty: expected a Hugging Face checkpoint directory"):
        models.load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"has no config.json: expected a Hugging Face checkpoint directory "
                                                r"\(config.json, \*.safetensors, tokenizer files\)"):
        models.load_model(tmp_path)


def test_unsupported_model_type(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt_neox'; supported: llama, phi"):
        models.load_model(llama_dir)


def test_truncated_safetensors_names_the_file(llama_dir):
    path = llama_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt.*download the checkpoint again"):
        models.load_model(llama_dir)


def test_missing_shard_and_missing_weights(tmp_path, hf_llama):
    ckpt = save_checkpoint(hf_llama, tmp_path / "sharded", sharded=True)
    next(ckpt.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="shards listed in model.safetensors.index.json are missing"):
        models.load_model(ckpt)
    (ckpt / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match="checkpoint is missing tensors"):
        models.load_model(ckpt)
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="has no weights"):
        models.load_model(ckpt)


def test_missing_tokenizer_files(llama_dir):
    (llama_dir / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer \(tokenizer.json or tokenizer.model\); copy the "
                                                r"tokenizer files of the original repo into it"):
        models.load_tokenizer(llama_dir)


def test_old_rotary_inv_freq_is_skipped_and_unknown_tensors_rejected(llama_dir, hf_llama):
    """Older Llama checkpoints carry rotary_emb.inv_freq buffers: recomputed, so skipped (as litgpt and
    torchtune do); any other unknown tensor means a wrong model_type and is an error."""
    from safetensors.torch import load_file, save_file

    path = llama_dir / "model.safetensors"
    tensors = load_file(path)
    save_file({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}, path)
    assert max_logit_diff(hf_llama, models.load_model(llama_dir)) < 1e-4
    save_file({**tensors, "model.layers.0.mlp.fc1.weight": torch.ones(8)}, path)
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mlp.fc1.weight' for model_type 'llama'"):
        models.load_model(llama_dir)
