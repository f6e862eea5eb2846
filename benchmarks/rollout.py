#!/usr/bin/env python
"""Rollout cost of the RL methods, side by side in one run.

1. **Generation**: generated tokens/s of :func:`megatron_midtrain.rl.generation.generate` on one
   model, KV cache vs full recompute (and Hugging Face ``generate`` on the same weights, exported
   with our converter, when ``--hf`` is given and transformers is installed), same prompts, same
   greedy tokens (checked), each timed ``--repeats`` times in turn (median).
2. **Training split**: ``--steps`` steps of the RMT loop (``experiment=rmt_demo`` by default)
   after one warm-up step: the share of step time spent generating vs recomputing log-probs and
   updating, and the generation tokens/s inside the loop.

    python benchmarks/rollout.py                         # demo model, CPU
    python benchmarks/rollout.py --checkpoint CKPT --hf  # e.g. a ~1B model on one GPU

Prints a table and one JSON line. Single process (world size 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_midtrain.utils.quiet import silence_known_warnings  # noqa: E402

silence_known_warnings()


def _time_generation(model, tok, prompts, new_tokens: int, repeats: int, hf_dir: str | None) -> dict:
    import torch

    from megatron_midtrain.rl.generation import SamplingParams, generate

    params = SamplingParams(max_new_tokens=new_tokens, greedy=True)  # no EOS: every row makes new_tokens
    runs: dict[str, list[float]] = {"kv_cache": [], "recompute": []}
    outputs = {}
    hf = None
    if hf_dir:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=next(model.parameters()).dtype)
        hf.to(next(model.parameters()).device).eval()
        runs["hf_generate"] = []
    for _ in range(repeats):
        for name in runs:
            t0 = time.perf_counter()
            if name == "hf_generate":
                ids = torch.tensor(prompts, device=next(hf.parameters()).device)
                with torch.no_grad():
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                responses = out[:, ids.shape[1]:].tolist()
            else:
                res = generate(model, prompts, params, vocab_size=tok.vocab_size, use_kv_cache=name == "kv_cache",
                               max_batch_rows=len(prompts))
                responses = res.responses
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            runs[name].append(time.perf_counter() - t0)
            outputs[name] = responses
    tokens = len(prompts) * new_tokens
    out = {name: {"seconds": statistics.median(t), "tokens_per_s": tokens / statistics.median(t)} for name, t in runs.items()}
    # HF's min_new_tokens masks EOS, which greedy decoding here may pick: compare the tokens
    # before kv_cache's first EOS.
    def same(rows):
        ref = [r[: r.index(tok.eod)] if tok.eod in r else r for r in outputs["kv_cache"]]
        return all(o[: len(x)] == x for o, x in zip(rows, ref))

    out["same_tokens"] = {name: same(outputs[name]) for name in outputs}
    return out


def _export_hf(checkpoint: str, out: str) -> str:
    from megatron_midtrain.convert.api import export_hf

    export_hf(checkpoint, out)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="model for the generation benchmark (default: the demo base model)")
    p.add_argument("--batch", type=int, default=64, help="rows generated together")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=5, help="RMT loop steps timed (after 1 warm-up step)")
    p.add_argument("--hf", action="store_true", help="also time Hugging Face generate on the exported weights")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the RMT run (default experiment=rmt_demo)")
    args = p.parse_args(argv)

    import numpy as np
    import torch.distributed as dist

    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.training.demo_models import ensure_base, with_demo_models
    from megatron_midtrain.training.metrics import read_metrics
    from megatron_midtrain.training.trainer import build_trainer

    with tempfile.TemporaryDirectory() as tmp:
        overrides = args.overrides or ["experiment=rmt_demo"]
        cfg = load_config(overrides + [f"run.dir={os.path.join(tmp, 'run')}", f"train.max_steps={args.steps + 1}",
                                       "train.save_interval=0", "train.eval_interval=0", "run.plot=false"])
        cfg = with_demo_models(cfg)  # builds/reuses the demo base model and entropy index when on the demo data
        trainer = build_trainer(cfg)
        # --- 1. generation on the policy (or --checkpoint) ---
        if args.checkpoint:
            from megatron_midtrain.eval.scorer import load_stage

            model, _, meta = load_stage(args.checkpoint)
            ckpt_dir = meta["path"]
        else:
            model = trainer.model.module
            ckpt_dir = None if cfg.data.paths else ensure_base(cfg)
        tok = trainer.tokenizer
        rng = np.random.default_rng(0)
        sample = [trainer.data.train[int(i)]["tokens"][: args.prompt_tokens].tolist() for i in rng.integers(0, len(trainer.data.train), args.batch)]
        hf_dir = _export_hf(ckpt_dir, os.path.join(tmp, "hf")) if args.hf and ckpt_dir else None
        gen = _time_generation(model, tok, sample, args.new_tokens, args.repeats, hf_dir)
        # --- 2. the RMT loop's split ---
        trainer.train()
        trainer.close()
        records = read_metrics(cfg.run.dir)[1:]  # drop the warm-up step
    keys = ("rl/gen_time_s", "rl/train_time_s", "step_time_s", "rl/gen_tokens_per_s", "rl/gen_time_frac")
    loop = {k: statistics.median(r[k] for r in records) for k in keys}
    print(f"generation: {args.batch} rows x {args.prompt_tokens} prompt + {args.new_tokens} new tokens, greedy")
    for name, v in gen.items():
        if name != "same_tokens":
            same = gen["same_tokens"].get(name)
            print(f"  {name:12s} {v['tokens_per_s']:9.0f} tok/s  ({v['seconds']:.3f} s; greedy tokens equal to kv_cache's up to EOS: {same})")
    if "recompute" in gen:
        print(f"  kv_cache / recompute speed-up: {gen['kv_cache']['tokens_per_s'] / gen['recompute']['tokens_per_s']:.2f}x")
    if "hf_generate" in gen:
        print(f"  kv_cache / hf_generate: {gen['kv_cache']['tokens_per_s'] / gen['hf_generate']['tokens_per_s']:.2f}x")
    print(f"RMT loop ({' '.join(overrides)}), median of {len(records)} steps: step {loop['step_time_s']:.2f} s = "
          f"generation {loop['rl/gen_time_s']:.2f} s ({loop['rl/gen_time_frac']:.0%}) + log-prob recompute and update "
          f"{loop['rl/train_time_s']:.2f} s; generation {loop['rl/gen_tokens_per_s']:.0f} tok/s in the loop")
    result = {"generation": gen, "loop": loop, "overrides": overrides}
    print(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
