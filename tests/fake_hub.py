"""Test helpers: tiny random Hugging Face checkpoints (transformers as the oracle), checks shared by the
Llama and Phi tests, and a local fake of the Hugging Face hub (no network)."""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import transformers

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def tiny_hf_model(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A 2-layer random transformers model in eval mode ("llama" or "phi").

    Norm weights and biases are perturbed too, so a swapped or ignored parameter changes the logits.
    """
    torch.manual_seed(seed)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides}))
    else:
        model = transformers.PhiForCausalLM(transformers.PhiConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def write_tiny_llama(directory: Path, seed: int, vocab_size: int) -> Path:
    """A 2-layer, hidden-32 random Llama (GQA) as config.json + model.safetensors in `directory`
    (the tokenizer files are the caller's), built by our own code from the seed."""
    import models
    from safetensors.torch import save_file

    config = dict(model_type="llama", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    model = models.build_model(config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    return directory


def save_checkpoint(model: transformers.PreTrainedModel, path: Path, sharded: bool = False) -> Path:
    """save_pretrained as safetensors; `sharded` splits it into several files with an index."""
    model.save_pretrained(path, max_shard_size="40KB" if sharded else "5GB")
    return path


# ------------------------------------------------------------- behaviour checks shared by both families
def random_ids(shape: tuple[int, ...], seed: int, vocab: int = TINY["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_logit_diff(hf: transformers.PreTrainedModel, ours: torch.nn.Module) -> float:
    """Max abs difference of float32 logits on a random batch."""
    ids = random_ids((2, 12), seed=1)
    return (ours(ids) - hf(ids).logits).abs().max().item()


@torch.no_grad()
def check_kv_cache_equals_full_forward(model: torch.nn.Module) -> None:
    """A 4-token prompt, then one token at a time through the cache == one full forward."""
    ids = random_ids((2, 10), seed=2)
    cache = model.new_cache(batch_size=2, max_len=16)
    prefill = model(ids[:, :4], cache=cache)
    steps = [model(ids[:, t:t + 1], cache=cache) for t in range(4, 10)]
    assert cache.length == 10
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), model(ids), rtol=0, atol=1e-5)


@torch.no_grad()
def check_padded_batch_equals_alone(model: torch.nn.Module) -> None:
    """Right padding (training, scoring) and left padding (generation) leave each row's logits as alone."""
    seqs = [random_ids((n,), seed=3 + n) for n in (9, 5)]
    alone = [model(s[None])[0] for s in seqs]
    for side in ("right", "left"):
        ids = torch.zeros(2, 9, dtype=torch.long)
        mask = torch.zeros(2, 9, dtype=torch.long)
        for i, s in enumerate(seqs):
            span = slice(0, len(s)) if side == "right" else slice(9 - len(s), 9)
            ids[i, span], mask[i, span] = s, 1
        logits = model(ids, attention_mask=mask)
        assert not logits.isnan().any()
        for i in range(2):
            torch.testing.assert_close(logits[i][mask[i].bool()], alone[i], rtol=0, atol=1e-5)


@torch.no_grad()
def check_left_padded_generation_equals_alone(model: torch.nn.Module) -> None:
    """Prefill a left-padded batch into the cache, decode two tokens: each row's logits as alone."""
    short, long_, nxt = random_ids((3,), seed=4), random_ids((6,), seed=5), random_ids((2, 2), seed=6)
    ids = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), short]), long_])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    cache = model.new_cache(2, 8)
    model(ids, attention_mask=mask, cache=cache)
    for t in range(2):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        step = model(nxt[:, t:t + 1], attention_mask=mask, cache=cache)[:, 0]
    for i, prompt in enumerate((short, long_)):
        expected = model(torch.cat([prompt, nxt[i]])[None])[0, -1]
        torch.testing.assert_close(step[i], expected, rtol=0, atol=1e-5)


class SDPACalls:
    """Counts F.scaled_dot_product_attention calls, and those given a mask, while patched in."""

    def __init__(self, monkeypatch):
        self.calls, self.masked = 0, 0
        real = torch.nn.functional.scaled_dot_product_attention

        def counting(*args, attn_mask=None, is_causal=False, **kw):
            self.calls += 1
            self.masked += attn_mask is not None
            assert is_causal == (attn_mask is None)
            return real(*args, attn_mask=attn_mask, is_causal=is_causal, **kw)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)


def _right_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = random_ids((3, 9), seed=7)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7])
    return ids * mask, mask


def _logits_and_grads(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    """Logits at the real positions and the parameters' gradients of a weighted sum of them."""
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask)[mask.bool()]
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(8))
    (logits * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def check_right_padding_takes_the_causal_path(model: torch.nn.Module, monkeypatch) -> None:
    """A right-padded batch passes SDPA no mask (its is_causal path) and gives the masked path's
    logits and gradients at every real position; left padding still passes the mask."""
    import llama

    ids, mask = _right_padded_batch()
    sdpa = SDPACalls(monkeypatch)
    causal = _logits_and_grads(model, ids, mask)
    layers = model.config.num_hidden_layers
    assert (sdpa.calls, sdpa.masked) == (layers, 0)
    monkeypatch.setattr(llama, "is_right_padded", lambda m: False)  # force the masked path
    masked = _logits_and_grads(model, ids, mask)
    assert (sdpa.calls, sdpa.masked) == (2 * layers, layers)
    torch.testing.assert_close(causal[0], masked[0], rtol=0, atol=1e-5)
    assert causal[1].keys() == masked[1].keys() and len(causal[1]) > 0
    for name in causal[1]:
        torch.testing.assert_close(causal[1][name], masked[1][name], rtol=1e-4, atol=1e-6)
    monkeypatch.undo()
    sdpa = SDPACalls(monkeypatch)
    with torch.no_grad():
        model(ids.flip(1), attention_mask=mask.flip(1))  # left padding
    assert (sdpa.calls, sdpa.masked) == (layers, layers)


# --------------------------------------------------------------------------------------- fake hub
class FakeHub:
    """A threaded HTTP server on 127.0.0.1 answering the requests huggingface_hub's snapshot_download
    makes (repo info, recursive tree listing, HEAD + GET of /{repo}/resolve/{sha}/{file}) from local
    directories. Each repo has one commit, which "main" names too; any other revision is answered
    like the hub answers a revision it lacks (404 RevisionNotFound). `downloads` records every file
    GET and `revisions` every revision asked for, so tests can assert what was fetched at which commit.
    """

    def __init__(self):
        self.repos: dict[str, Path] = {}
        self.commits: dict[str, str] = {}
        self.denied: dict[str, int] = {}  # repo id -> HTTP status of a gated answer (401 or 403)
        self.downloads: list[tuple[str, str]] = []
        self.revisions: set[tuple[str, str]] = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def add_repo(self, repo_id: str, directory: Path, gated_status: int | None = None,
                 commit: str | None = None) -> None:
        """Serve `directory` as `repo_id` at `commit` (default: a hash of the repo id)."""
        self.repos[repo_id] = Path(directory)
        self.commits[repo_id] = commit or self.sha(repo_id)
        if gated_status:
            self.denied[repo_id] = gated_status

    def fetched(self, repo_id: str) -> set[str]:
        return {f for r, f in self.downloads if r == repo_id}

    @staticmethod
    def sha(repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def __enter__(self) -> "FakeHub":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            parts = self.path.split("?")[0].strip("/").split("/")
            if parts[:2] == ["api", "models"]:
                repo_id, rest = "/".join(parts[2:4]), parts[4:]
            else:
                repo_id, rest = "/".join(parts[:2]), parts[2:]
            if repo_id not in hub.repos:
                return self._send(404, b"", {"X-Error-Code": "RepoNotFound"})
            if repo_id in hub.denied:
                return self._send(hub.denied[repo_id], b"", {"X-Error-Code": "GatedRepo",
                                                             "X-Error-Message": "Access to this model is restricted"})
            root, sha = hub.repos[repo_id], hub.commits[repo_id]
            if len(rest) > 1:
                hub.revisions.add((repo_id, rest[1]))
                if rest[1] not in ("main", sha):
                    return self._send(404, b"", {"X-Error-Code": "RevisionNotFound"})
            files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
            if rest[:1] == ["revision"]:
                info = {"id": repo_id, "sha": sha, "siblings": [{"rfilename": f} for f in files]}
                return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
            if rest[:1] == ["tree"]:
                tree = [{"type": "file", "path": f, "size": (root / f).stat().st_size,
                         "oid": hashlib.sha1((root / f).read_bytes()).hexdigest()} for f in files]
                return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
            name = "/".join(rest[2:])
            if rest[:1] != ["resolve"] or name not in files:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound"})
            data = (root / name).read_bytes()
            if body:
                hub.downloads.append((repo_id, name))
            self._send(200, data if body else b"", {
                "X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "Content-Length": str(len(data))}, length=len(data))

        def _send(self, status: int, data: bytes, headers: dict[str, str], length: int | None = None) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(data) if length is None else length))
            self.end_headers()
            if data:
                self.wfile.write(data)

    return Handler


def use_fake_hub(monkeypatch, hub: FakeHub, home: Path) -> None:
    """Point huggingface_hub at `hub`, with its cache under `home` and no token."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)


def write_word_tokenizer(directory: Path, add_bos: bool) -> None:
    """A tiny word-level tokenizer.json with Llama-style special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "hello", "world", "the", "answer", "is", "42"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": add_bos, "bos_token": "<s>", "eos_token": "</s>"}))
