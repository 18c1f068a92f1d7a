"""LoRA training steps of a random Llama on one GPU: tokens/s, peak memory, MFU.

--step compat (default), the exact code path of `train.py --stage 3`: base v1 + task adapter (teacher M1), one base v2
holding the frozen task adapter (teacher M2) and the trainable compatibility adapter (student),
all in bf16 under FSDP2 (world size 1) with fp32 LoRA master weights, the chunked MUSCLE loss,
AdamW. Weights are random (same shapes as the real models), so nothing is downloaded.

    python bench/gpu_train.py --shape 7b --batch-size 4 --seq-len 512
    python bench/gpu_train.py --shape 1b --grad-checkpointing
    python bench/gpu_train.py --shape tiny --steps 3          # CPU smoke test of the script
    python bench/gpu_train.py --step task --stack ours        # stage 1/2 step (CE), ours
    python bench/gpu_train.py --step task --stack peft        # the same step in transformers + PEFT

--step task is the task-adapter step of stages 1-2 (base + one trainable adapter, cross-entropy);
with --stack peft the same shapes, rank and targets run as transformers' LlamaForCausalLM (built
from the config in bf16, SDPA attention) + PEFT's get_peft_model (adapters in fp32, PEFT's
default), through the same trainer.Trainer step (token-normalised gradients, clipping, AdamW).
Run ours and peft on the same machine and compare; the compat/task ratio is
`--step compat` over `--step task --stack ours`. Each run appends its JSON line to
bench/RESULTS.md's GPU section.

Model FLOPs per token (the MFU numerator; recomputation under --grad-checkpointing is not
counted, as usual): three forward passes (M1, M2, student) at 2N each, plus the student's
backward to its activations at 2N (the frozen base needs no weight gradients; the LoRA weight
gradients are negligible), so 8N, plus attention scores at 4 * layers * seq * hidden per forward
(the backward counted twice). The task step has one forward: 4N plus 3 attention terms. The
peak is a bf16 matmul rate measured here, not a datasheet.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import distributed
import lora
import losses
import models
import train
import trainer

SHAPES = {  # HF config.json fields; vocabulary of Llama 1/2
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,  # TinyLlama-1.1B
               num_attention_heads=32, num_key_value_heads=4),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


def config(shape: str) -> dict:
    return dict(model_type="llama", vocab_size=32000, max_position_embeddings=4096,
                rms_norm_eps=1e-5, tie_word_embeddings=False, **SHAPES[shape])


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 20) -> float:
    """Measured dense matmul rate: the MFU denominator."""
    if device.type == "cpu":
        n, repeats = 1024, 5
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_model(cfg: dict, dtype: torch.dtype, device: torch.device, seed: int) -> torch.nn.Module:
    """Built directly in `dtype` on `device` (a 7B model never exists in fp32)."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return models.build_model(cfg)
    finally:
        torch.set_default_dtype(default)


def build(args: argparse.Namespace, env: distributed.Dist, dtype: torch.dtype):
    """(student with task + compat adapters, sharded; teacher M1, sharded; trainable params)."""
    cfg = config(args.shape)
    old = random_model(cfg, dtype, env.device, seed=1)
    lora.add_adapter(old, "task", rank=args.rank, alpha=2 * args.rank)
    student = random_model(cfg, dtype, env.device, seed=2)
    lora.add_adapter(student, "task", rank=args.rank, alpha=2 * args.rank)
    lora.copy_adapter(student, "task", "compat")
    lora.mark_trainable(student, "compat")
    student = train.prepare(student, env, args.grad_checkpointing)
    old = train.frozen_teacher(old, env)
    return student, old, lora.adapter_parameters(student, "compat"), cfg


def build_task(args: argparse.Namespace, env: distributed.Dist, dtype: torch.dtype):
    """(model, trainable params, loss_fn -> (loss sum, tokens)) for one task adapter, ours or PEFT's."""
    cfg = config(args.shape)
    if args.stack == "ours":
        model = random_model(cfg, dtype, env.device, seed=2)
        lora.add_adapter(model, "task", rank=args.rank, alpha=2 * args.rank)
        lora.mark_trainable(model, "task")
        model = train.prepare(model, env, args.grad_checkpointing)
        return model, lora.adapter_parameters(model, "task"), losses.ce_loss(model), cfg
    import peft
    import transformers

    torch.manual_seed(2)
    hf_config = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device(env.device):
        base = transformers.LlamaForCausalLM._from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(base, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets))
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss_fn(b):  # the mean over the shifted labels, back to a sum as the Trainer expects
        tokens = int((b["labels"][:, 1:] != -100).sum())
        return model(**b).loss * tokens, tokens
    return model, params, loss_fn, cfg


def model_flops_per_token(cfg: dict, n_params: int, seq: int, forwards: int) -> float:
    """2N per forward, 2N for the student's backward to its activations, attention terms."""
    attention = 4 * cfg["num_hidden_layers"] * seq * cfg["hidden_size"]
    return 2 * n_params * (forwards + 1) + (forwards + 2) * attention


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps (after 2 warm-up)")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--step", default="compat", choices=["compat", "task"])
    p.add_argument("--stack", default="ours", choices=["ours", "peft"], help="--step task only")
    return p


def measure(args: argparse.Namespace, env: distributed.Dist, peak_tflops: float) -> dict:
    """Time `args.steps` optimizer steps after two warm-up steps: tokens/s, peak memory, MFU."""
    dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32
    if args.step == "compat":
        student, old, params, cfg = build(args, env, dtype)
        loss_fn = losses.compat_loss(student, old, argparse.Namespace(
            mask="student_correct", temperature=2.0, ce_weight=0.0, chunk_size=args.chunk_size))
    else:
        student, params, loss_fn, cfg = build_task(args, env, dtype)
    n_params = sum(p.numel() for n, p in student.named_parameters() if "lora_" not in n)
    ids = torch.randint(0, cfg["vocab_size"], (args.batch_size, args.seq_len), device=env.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with tempfile.TemporaryDirectory() as run_dir:
        fit = trainer.Trainer(student, params, loss_fn, trainer.FitConfig(grad_accum=1, warmup_steps=1),
                              Path(run_dir), env)
        for _ in range(2):
            fit.step([batch], [], total_steps=args.steps + 2)
        sync(env.device)
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            loss, tokens, _ = fit.step([batch], [], total_steps=args.steps + 2)
        sync(env.device)
        seconds = (time.perf_counter() - start) / args.steps
    tokens_per_s = args.batch_size * args.seq_len / seconds
    forwards = 3 if args.step == "compat" else 1
    achieved = tokens_per_s * model_flops_per_token(cfg, n_params, args.seq_len, forwards) / 1e12
    return {
        "device": torch.cuda.get_device_name() if env.device.type == "cuda" else "cpu",
        "step": args.step, "stack": args.stack, "shape": args.shape, "params_base": n_params, "trainable": sum(p.numel() for p in params.values()),
        "batch": args.batch_size, "seq_len": args.seq_len, "grad_checkpointing": args.grad_checkpointing,
        "step_s": round(seconds, 4), "tokens_per_s": round(tokens_per_s, 1), "loss": loss,
        "peak_memory_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                            if env.device.type == "cuda" else None),
        "model_tflops": round(achieved, 2), "matmul_tflops": round(peak_tflops, 2),
        "mfu": round(achieved / peak_tflops, 4),
    }


def main() -> None:
    p = parser()
    args = p.parse_args()
    if args.stack == "peft" and args.step != "task":
        p.error("--stack peft times the task step only (PEFT has no MUSCLE loss): add --step task")
    env = distributed.setup()
    dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32
    result = measure(args, env, matmul_tflops(env.device, dtype))
    print(json.dumps(result))
    if env.main and env.device.type == "cuda":
        record(result)
    distributed.teardown()


def record(result: dict) -> None:
    """Append the run's JSON line to the GPU section of bench/RESULTS.md (kept across runs)."""
    from bench import common

    start = "<!-- bench:gpu -->"
    text = common.RESULTS.read_text() if common.RESULTS.is_file() else ""
    lines = text.split(start, 1)[1].split("<!-- /bench:gpu -->")[0].splitlines() if start in text else []
    runs = [line for line in lines if line.startswith("- `{")]
    runs.append(f"- `{json.dumps(result)}` ({time.strftime('%Y-%m-%d', time.gmtime())}, torch {torch.__version__})")
    common.write_section("gpu", "GPU: LoRA task and MUSCLE steps (bf16)", "\n".join(runs))


if __name__ == "__main__":
    main()
