#!/usr/bin/env python
"""Training throughput of the real Trainer (tokens/s; TFLOP/s per GPU and MFU on CUDA).

    python benchmarks/throughput.py [--model demo|llama1b] [--steps 10] [--warmup 3] [overrides ...]
    torchrun --nproc-per-node 8 benchmarks/throughput.py --model llama1b parallel.tp=2
    python benchmarks/throughput.py --steps 1 --warmup 0        # smallest setting (CI smoke test)

The method is NTP unless the overrides choose one (``method=remit`` etc.). The trainer is
built as ``midtrain`` builds it: :func:`Trainer` (the RL methods get their rollout
loop) after :func:`with_demo_models` (on the demo data a reference-based method gets the
cached demo reference, built on first use, and RMT its entropy index). Then it runs
``--warmup`` optimizer steps untimed, then times
``--steps`` steps of ``Trainer.train_step()`` (forward, backward, grad
all-reduce, clipping, optimizer) and prints a summary followed by one JSON line.
Checkpoints, evaluation and metric files are not part of the measurement (the
run directory is a temporary one unless ``run.dir=`` is given).

FLOP accounting (model FLOPs, the usual MFU convention; no recomputation counted)
-----------------------------------------------------------------------------------
Per trained token, with L layers, hidden h, query width a = heads * head_dim,
KV width k = query_groups * head_dim, SwiGLU width f, sequence length s and the
(padded) vocabulary V:

    N    = L * (h*a + 2*h*k + a*h + 3*h*f)   non-embedding matmul weights
                                             (Q, K, V, O projections, gate/up/down);
                                             norm weights and biases are left out (<0.1%)
    FLOPs/token = 6*N                        dense matmuls: 2 forward + 4 backward per weight
                + 12*L*s*a                   attention scores QK^T and context AV:
                                             2 matmuls * 2*s*a forward, x3 for backward
                + 6*h*V                      LM head (the input embedding is a lookup: 0)

The attention term counts *full* s x s attention, as Megatron-LM's
``num_floating_point_operations`` and PaLM's MFU definition do: causal masking
would halve the useful work (6*L*s*a) but kernels and the convention count it
in full, so reported MFU is comparable with Megatron-LM's figures.

TFLOP/s per GPU = FLOPs/token * tokens/s / world size; MFU = that / peak dense
bf16 FLOP/s of the GPU: H100 SXM 989e12, H200 989e12 (same compute as H100 SXM),
H100 PCIe 756e12, H100 NVL 835e12, A100 312e12; anything else needs ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")

#: Overrides applied for every preset: no periodic eval, saves or plots inside the timing.
COMMON = ["train.eval_interval=0", "train.save_interval=0", "run.plot=false", "train.log_interval=1000000"]

PRESETS = {
    # The embedded demo (demo corpus, demo tokenizer, demo-llama-tiny) exactly as configured.
    "demo": [],
    # ~1.2B Llama-3.2-1B-shaped model for GPUs. The demo tokenizer (2048 ids) is enough for
    # throughput: the tokenizer only has to fit inside model.vocab_size.
    "llama1b": [
        "model.name=llama-1b",
        "model.num_layers=16",
        "model.hidden_size=2048",
        "model.ffn_hidden_size=8192",
        "model.num_attention_heads=32",
        "model.num_query_groups=8",
        "model.vocab_size=128256",
        "model.max_position_embeddings=4096",
        "model.rope_theta=500000.0",
        "model.rope_scaling_factor=32.0",
        "model.tie_embeddings=true",
        "data.seq_length=4096",
        "train.micro_batch_size=1",
        "train.global_batch_tokens=65536",
    ],
}

#: Peak dense bf16 FLOP/s by device-name substring (checked in order).
PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def flops_per_token(model, seq_length: int, padded_vocab: int) -> dict:
    """Training FLOPs per token, split into the terms documented above."""
    h, L, f = model.hidden_size, model.num_layers, model.ffn_hidden_size
    head_dim = model.head_dim or h // model.num_attention_heads
    a = model.num_attention_heads * head_dim
    k = (model.num_query_groups or model.num_attention_heads) * head_dim
    n_nonemb = L * (h * a + 2 * h * k + a * h + 3 * h * f)
    dense = 6 * n_nonemb
    attention = 12 * L * seq_length * a
    head = 6 * h * padded_vocab
    return {
        "n_params_nonembedding": n_nonemb,
        "dense": dense,
        "attention_full": attention,
        "lm_head": head,
        "total": dense + attention + head,
    }


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    for key, value in PEAK_BF16:
        if key in device_name:
            return value
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. parallel.tp=2 train.micro_batch_size=2")
    p.add_argument("--model", choices=sorted(PRESETS), default="demo", help="preset overrides (default: the demo)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps before timing")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s per GPU for MFU (default: by GPU name)")
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")

    import torch
    import torch.distributed as dist

    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.errors import UserError
    from megatron_midtrain.model.builder import padded_vocab_size
    from megatron_midtrain.training.demo_models import with_demo_models
    from megatron_midtrain.training.trainer import Trainer

    total_steps = args.warmup + args.steps
    # The config's default method is ReMiT, which needs a reference: plain training throughput
    # is NTP's unless the command line picks a method.
    method = [] if any(o.startswith("method=") for o in args.overrides) else ["method=ntp"]
    overrides = COMMON + PRESETS[args.model] + method + list(args.overrides) + [f"train.max_steps={total_steps}"]
    user_dir = any(o.startswith("run.dir=") for o in args.overrides)
    tmp = None
    if not user_dir:
        tmp = tempfile.mkdtemp(prefix="throughput-")
        overrides.append(f"run.dir={tmp}")
    try:
        cfg = load_config(overrides)
        trainer = Trainer(with_demo_models(cfg))
    except UserError as err:
        sys.exit(f"error: {err}")
    try:
        cuda = torch.cuda.is_available()
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank0 = not dist.is_initialized() or dist.get_rank() == 0

        def sync():
            if cuda:
                torch.cuda.synchronize()
            if dist.is_initialized() and world > 1:
                dist.barrier()

        losses = []
        for _ in range(args.warmup):
            losses.append(trainer.train_step()["loss"])
        sync()
        step_times = []
        start = time.perf_counter()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            losses.append(trainer.train_step()["loss"])
            sync()
            step_times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start

        tokens = args.steps * cfg.train.global_batch_tokens
        tokens_per_s = tokens / elapsed
        flops = flops_per_token(cfg.model, cfg.data.seq_length, padded_vocab_size(cfg.model, cfg.parallel.tp))
        result = {
            "model": cfg.model.name,
            "preset": args.model,
            "method": cfg.method.name,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "world_size": world,
            "layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": trainer.layout.dp},
            "dtype": str(trainer.dtype).replace("torch.", ""),
            "cpu_threads": None if cuda else torch.get_num_threads(),
            "seq_length": cfg.data.seq_length,
            "global_batch_tokens": cfg.train.global_batch_tokens,
            "micro_batch_size": cfg.train.micro_batch_size,
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
            "elapsed_s": round(elapsed, 4),
            "step_time_s_median": round(sorted(step_times)[len(step_times) // 2], 4),
            "tokens_per_s": round(tokens_per_s, 1),
            "tokens_per_s_per_device": round(tokens_per_s / world, 1),
            "flops_per_token": flops["total"],
            "flops_per_token_terms": flops,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
        }
        if cuda:
            tflops = flops["total"] * tokens_per_s / world / 1e12
            peak = peak_flops(result["device"], args.peak_tflops)
            result["tflops_per_gpu"] = round(tflops, 2)
            result["peak_tflops_per_gpu"] = peak / 1e12 if peak else None
            result["mfu"] = round(tflops * 1e12 / peak, 4) if peak else None
            result["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if result["dtype"] != "bfloat16":
                result["note"] = "MFU is relative to the bf16 peak but the run is not bf16"
        if rank0:
            print(f"{result['model']} ({result['method']}) on {result['device']} x{world} ({result['dtype']}): "
                  f"{args.steps} steps of {cfg.train.global_batch_tokens} tokens in {elapsed:.2f}s "
                  f"-> {tokens_per_s:,.0f} tokens/s ({tokens_per_s / world:,.0f} per device)", flush=True)
            if cuda:
                mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (pass --peak-tflops)"
                print(f"  {result['tflops_per_gpu']:.1f} TFLOP/s per GPU, MFU {mfu}, "
                      f"{flops['total'] / 1e9:.2f} GFLOP/token", flush=True)
            print(json.dumps(result), flush=True)
    finally:
        trainer.close()
        if tmp is not None and (not dist.is_initialized()):
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
