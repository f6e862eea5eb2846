#!/usr/bin/env python
"""Rollout cost of the RL methods, side by side in one run.

1. **Generation**: generated tokens/s of :func:`megatron_midtrain.rl.generation.generate` on one
   model, KV cache vs full recompute (and Hugging Face ``generate`` on the same weights, exported
   with our converter, when ``--hf`` is given and transformers is installed), same prompts, same
   greedy tokens (checked), each timed ``--repeats`` times in turn (best of them, and the median).
2. **Training split**: ``--steps`` steps of the RMT loop (``experiment=rmt_demo`` by default)
   after one warm-up step: the share of step time spent generating vs recomputing log-probs and
   updating, and the generation tokens/s inside the loop.

    python benchmarks/rollout.py                         # demo model, CPU
    python benchmarks/rollout.py --checkpoint CKPT --hf  # e.g. a ~1B model on one GPU
    python benchmarks/rollout.py --smoke --hf            # smallest setting (CI smoke test, seconds)

Without ``--checkpoint`` the generation benchmark runs on the RMT run's policy (on the demo:
the demo base model it starts from); ``--hf`` exports exactly those weights (the
``train.init_from`` checkpoint, or the freshly initialised policy saved as step 0).

``--smoke`` changes the inputs only, never the code path: a synthetic entropy index
(:func:`megatron_midtrain.testing.rollouts.demo_entropy_dirs`) and a freshly initialised policy
instead of the demo base model and its entropy index (which take minutes to build on a CPU the
first time), 4 prompts x 2 rollouts per step, 2 rows of 4 prompt + 2 new tokens of generation, 1 repeat,
1 timed step unless given.

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
        # Our generate never samples ids beyond the tokenizer's vocabulary (the model's rows past
        # it are padding); HF gets the same restriction, so both choose among the same tokens.
        hf_vocab = hf.config.get_text_config().vocab_size
        suppress = {"suppress_tokens": list(range(tok.vocab_size, hf_vocab))} if hf_vocab > tok.vocab_size else {}
    for _ in range(repeats):
        for name in runs:
            t0 = time.perf_counter()
            if name == "hf_generate":
                ids = torch.tensor(prompts, device=next(hf.parameters()).device)
                with torch.no_grad():
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **suppress)
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
    # best of the repeats (interference from other processes only ever adds time), and the median
    out = {name: {"seconds": min(t), "tokens_per_s": tokens / min(t), "median_seconds": statistics.median(t)}
           for name, t in runs.items()}
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


#: The generation backend timed (what the RL step calls): megatron_midtrain.rl.generation.generate.
BACKEND = "native"

#: --smoke: the RMT loop's sizes (the rest is experiment=rmt_demo).
SMOKE_OVERRIDES = ["experiment=rmt_demo", "method.prompts_per_step=4", "method.group_size=2",
                   "method.rollout_micro_batch_size=4", "method.generation_batch_rows=8",
                   "train.global_batch_tokens=1024", "train.micro_batch_size=4"]
#: --smoke: generation sizes, unless given on the command line.
SMOKE_GENERATION = {"batch": 2, "prompt_tokens": 4, "new_tokens": 2, "repeats": 1, "steps": 1}


def _policy_checkpoint(cfg, trainer) -> str:
    """A checkpoint holding exactly the weights of ``trainer``'s policy before its first step:
    the ``train.init_from`` checkpoint, or (fresh initialisation) the policy saved as step 0."""
    from megatron_midtrain.training import checkpoint as ckpt

    if cfg.train.init_from:
        return ckpt.resolve_checkpoint_dir(cfg.train.init_from, what="train.init_from")
    trainer.save()
    return os.path.join(ckpt.checkpoint_root(cfg.run.dir), f"iter_{trainer.step:07d}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="model for the generation benchmark (default: the RMT run's policy, on the demo the demo base model)")
    p.add_argument("--batch", type=int, default=None, help="rows generated together (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 32")
    p.add_argument("--new-tokens", type=int, default=None, help="default 64")
    p.add_argument("--repeats", type=int, default=None, help="default 5")
    p.add_argument("--steps", type=int, default=None, help="RMT loop steps timed (after 1 warm-up step; default 5)")
    p.add_argument("--hf", action="store_true", help="also time Hugging Face generate on the exported weights")
    p.add_argument("--smoke", action="store_true",
                   help="smallest setting: synthetic entropy index, fresh policy, tiny sizes (CI smoke test)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the RMT run (default experiment=rmt_demo)")
    args = p.parse_args(argv)
    defaults = SMOKE_GENERATION if args.smoke else {"batch": 64, "prompt_tokens": 32, "new_tokens": 64, "repeats": 5, "steps": 5}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.batch, args.prompt_tokens, args.new_tokens, args.repeats, args.steps) < 1:
        p.error("--batch, --prompt-tokens, --new-tokens, --repeats and --steps must be >= 1")

    import numpy as np
    import torch.distributed as dist

    from megatron_midtrain.config.loader import load_config
    from megatron_midtrain.training.demo_models import with_demo_models
    from megatron_midtrain.training.metrics import read_metrics
    from megatron_midtrain.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        overrides = args.overrides or ["experiment=rmt_demo"]
        if args.smoke:
            from megatron_midtrain.data.demo import default_cache_dir
            from megatron_midtrain.testing.rollouts import demo_entropy_dirs

            dirs = demo_entropy_dirs(default_cache_dir(), os.path.join(tmp, "entropy"))
            overrides = SMOKE_OVERRIDES + [f"method.entropy_dirs=[{dirs[0]},{dirs[1]}]"] + list(args.overrides)
        cfg = load_config(overrides + [f"run.dir={os.path.join(tmp, 'run')}", f"train.max_steps={args.steps + 1}",
                                       "train.save_interval=0", "train.eval_interval=0", "run.plot=false"])
        if not args.smoke:
            cfg = with_demo_models(cfg)  # builds/reuses the demo base model and entropy index when on the demo data
        trainer = Trainer(cfg)
        # --- 1. generation on the policy (or --checkpoint) ---
        if args.checkpoint:
            from megatron_midtrain.eval.scorer import load_stage

            model, _, meta = load_stage(args.checkpoint)
            ckpt_dir = meta["path"]
        else:
            model = trainer.model.module
            ckpt_dir = _policy_checkpoint(cfg, trainer) if args.hf else None
        tok = trainer.data.tokenizer
        rng = np.random.default_rng(0)
        sample = [trainer.data.train[int(i)]["tokens"][: args.prompt_tokens].tolist() for i in rng.integers(0, len(trainer.data.train), args.batch)]
        hf_dir = _export_hf(ckpt_dir, os.path.join(tmp, "hf")) if args.hf else None
        gen = _time_generation(model, tok, sample, args.new_tokens, args.repeats, hf_dir)
        # --- 2. the RMT loop's split ---
        trainer.train()
        trainer.close()
        records = read_metrics(cfg.run.dir)[1:]  # drop the warm-up step
    keys = ("rl/gen_time_s", "rl/train_time_s", "step_time_s", "rl/gen_tokens_per_s", "rl/gen_time_frac")
    loop = {k: statistics.median(r[k] for r in records) for k in keys}
    print(f"generation: {args.batch} rows x {args.prompt_tokens} prompt + {args.new_tokens} new tokens, greedy")
    for name, v in gen.items():
        if isinstance(v, dict) and name != "same_tokens":
            same = gen["same_tokens"].get(name)
            print(f"  {name:12s} {v['tokens_per_s']:9.0f} tok/s  (best {v['seconds']:.3f} s, median {v['median_seconds']:.3f} s; greedy tokens equal to kv_cache's up to EOS: {same})")
    if "recompute" in gen:
        print(f"  kv_cache / recompute speed-up: {gen['kv_cache']['tokens_per_s'] / gen['recompute']['tokens_per_s']:.2f}x")
    if "hf_generate" in gen:
        ratio = gen['kv_cache']['tokens_per_s'] / gen['hf_generate']['tokens_per_s']
        gen["kv_cache_over_hf"] = ratio
        print(f"  kv_cache / hf_generate: {ratio:.2f}x  (ours {gen['kv_cache']['tokens_per_s']:.0f} tok/s, HF "
              f"{gen['hf_generate']['tokens_per_s']:.0f} tok/s, backend {BACKEND})")
    print(f"RMT loop ({' '.join(overrides)}), median of {len(records)} steps: step {loop['step_time_s']:.2f} s = "
          f"generation {loop['rl/gen_time_s']:.2f} s ({loop['rl/gen_time_frac']:.0%}) + log-prob recompute and update "
          f"{loop['rl/train_time_s']:.2f} s; generation {loop['rl/gen_tokens_per_s']:.0f} tok/s in the loop")
    result = {"generation": gen, "backend": BACKEND, "loop": loop, "overrides": overrides}
    print(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
