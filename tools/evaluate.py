#!/usr/bin/env python
"""Run lm-evaluation-harness on a checkpoint; the results JSON goes into the run directory.

    python tools/evaluate.py --checkpoint runs/x --tasks arc_challenge,gsm8k --limit 100
    python tools/evaluate.py --checkpoint runs/x --tasks preset:remit_fewshot --confirm-unsafe-code
    torchrun --nproc-per-node 2 tools/evaluate.py --checkpoint runs/x --tasks hellaswag --tp 2
    python tools/evaluate.py --checkpoint runs/x --tasks my_task --include-path my_tasks/ --backend hf

Backends: ``megatron`` (default) evaluates in-process with the megatron model (CPU or GPU,
TP/PP under torchrun) through an ``lm_eval`` model class; ``hf`` exports the checkpoint to a
Hugging Face folder and runs the harness's own ``hf`` model on it (single process). Results:
``<run dir>/eval/lm_eval_step<N>_<UTC time>.json`` (``--output`` to choose), written by rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_midtrain.utils.quiet import silence_known_warnings  # noqa: E402

silence_known_warnings()

from megatron_midtrain.errors import UserError, exit_on_user_error  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="run dir, checkpoints/ or a checkpoint directory")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks and/or presets (preset:remit_fewshot)")
    p.add_argument("--num-fewshot", type=int, default=None, help="shots for tasks not in a preset (default: the task's)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (or a fraction if < 1)")
    p.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAMLs (e.g. local tasks)")
    p.add_argument("--backend", choices=("megatron", "hf"), default="megatron")
    p.add_argument("--tp", type=int, default=1, help="megatron backend: tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="megatron backend: pipeline-parallel size")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16")
    p.add_argument("--batch-tokens", type=int, default=8192, help="megatron backend: padded tokens per forward pass")
    p.add_argument("--max-length", type=int, default=None, help="context window (default: the model's max_position_embeddings)")
    p.add_argument("--max-gen-toks", type=int, default=256, help="generation budget when a task does not set one")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="stderr bootstrap iterations (0 = skip)")
    p.add_argument("--confirm-unsafe-code", action="store_true", help="allow tasks that execute model-written code")
    p.add_argument("--output", default=None, help="results JSON path (default: <run dir>/eval/...)")
    return p.parse_args(argv)


def _megatron_lm(args, checkpoint_dir):
    """(lm, meta) with this process's TP/PP groups set up."""
    from megatron_midtrain.convert.api import parse_dtype
    from megatron_midtrain.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from megatron_midtrain.eval.lm_eval_model import MegatronLM
    from megatron_midtrain.eval.scorer import Scorer, init_parallel, load_stage

    init_parallel(args.tp, args.pp)
    model, model_cfg, meta = load_stage(checkpoint_dir, parse_dtype(args.dtype, "--dtype"))
    tok_path = meta.get("tokenizer_path")
    if not tok_path or not os.path.exists(tok_path):
        raise UserError(f"checkpoint {checkpoint_dir} names no existing tokenizer ({tok_path})",
                        "import the model from a folder with tokenizer.json, or restore the tokenizer file")
    tokenizer = load_tokenizer(tok_path)
    if meta.get("tokenizer") and tokenizer_fingerprint(tokenizer) != meta["tokenizer"]:
        raise UserError(f"tokenizer {tok_path} is not the one checkpoint {checkpoint_dir} was trained with",
                        "restore the original tokenizer file")
    max_length = args.max_length or model_cfg.max_position_embeddings
    scorer = Scorer(model, model_cfg.vocab_size, max_length, args.batch_tokens)
    return MegatronLM(scorer, tokenizer, max_gen_toks=args.max_gen_toks), meta


@exit_on_user_error
def main(argv=None) -> dict | None:
    args = parse_args(argv)
    from megatron_midtrain.eval import harness
    from megatron_midtrain.eval.checkpoint_logprobs import peek_checkpoint

    info = peek_checkpoint(args.checkpoint)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks is empty", "name at least one lm-eval task or preset")
    specs = harness.resolve_tasks(tasks, args.num_fewshot)
    manager = harness.task_manager(args.include_path, [s.task for s in specs])
    harness.check_tasks(specs, manager)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    common = dict(num_fewshot=args.num_fewshot, limit=args.limit, include_path=args.include_path,
                  bootstrap_iters=args.bootstrap_iters, confirm_unsafe_code=args.confirm_unsafe_code, manager=manager)
    rank0 = True
    if args.backend == "hf":
        if world > 1 or args.tp * args.pp > 1:
            raise UserError("--backend hf runs in one process", "use --backend megatron for TP/PP, or drop torchrun")
        import torch

        from megatron_midtrain.convert.api import export_hf

        with tempfile.TemporaryDirectory(prefix="midtrain_hf_eval_") as tmp:
            export_hf(info.path, os.path.join(tmp, "hf"), dtype=None if args.dtype == "auto" else args.dtype)
            from megatron_midtrain.training.distributed import shutdown

            shutdown()  # the export's 1-rank group; the harness's HF model manages its own devices
            model_args = {"pretrained": os.path.join(tmp, "hf"), "device": "cuda" if torch.cuda.is_available() else "cpu",
                          "dtype": "float32" if args.dtype == "auto" and not torch.cuda.is_available() else "auto"}
            if args.max_length:
                model_args["max_length"] = args.max_length
            results = harness.run_tasks("hf", tasks, model_args=model_args, **common)
    else:
        lm, _ = _megatron_lm(args, info.path)
        try:
            results = harness.run_tasks(lm, tasks, **common)
            import torch.distributed as dist

            rank0 = not dist.is_initialized() or dist.get_rank() == 0
        finally:
            from megatron_midtrain.training.distributed import shutdown

            shutdown()
    if not rank0:
        return None
    results["megatron_midtrain"].update(checkpoint=info.path, step=info.step, backend=args.backend, tp=args.tp, pp=args.pp)
    path = harness.write_results(results, args.output or harness.default_results_path(info.path, info.step))
    metrics = harness.flat_metrics(results)
    for key, value in sorted(metrics.items()):
        print(f"{key}: {value:.4f}")
    print(f"results: {path}")
    summary = {"results_path": path, "metrics": metrics}
    print(json.dumps(summary, sort_keys=True), flush=True)
    return summary


if __name__ == "__main__":
    main()
