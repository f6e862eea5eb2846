"""The optional in-training lm-eval hook (``lm_eval.tasks=[...]``).

At ``lm_eval.interval`` steps (and at the end) every rank runs the harness on the live
training model through :class:`~megatron_midtrain.eval.lm_eval_model.MegatronLM` (the
forward passes are collective, so all ranks take part under any TP/PP/DP layout). Rank 0
writes ``<run dir>/eval/lm_eval_step<N>.json``; the flat metrics go into metrics.jsonl as
``lm_eval/<task>/<metric>``. The validation loss (``val/loss``) is computed as before.
"""

from __future__ import annotations

import os

from megatron_midtrain.errors import UserError


def check_lm_eval_config(cfg) -> None:
    """Fail before training when the harness is missing or a task name is unknown."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("lm_eval.tasks is set but lm-evaluation-harness is not installed",
                        'pip install -e ".[eval]"  (or clear lm_eval.tasks)') from None
    from megatron_midtrain.eval import harness

    le = cfg.lm_eval
    specs = harness.resolve_tasks(list(le.tasks), le.num_fewshot)
    harness.check_tasks(specs, harness.task_manager(le.include_path, [s.task for s in specs]))
    if any(s.runs_code for s in specs):
        raise UserError("lm_eval.tasks includes code-execution tasks, which the training hook does not run",
                        "evaluate them after training with tools/evaluate.py --confirm-unsafe-code")


def due(cfg, step: int) -> bool:
    le = cfg.lm_eval
    return bool(le.tasks) and ((le.interval > 0 and step % le.interval == 0) or step == cfg.train.max_steps)


def run_in_training(trainer) -> dict[str, float]:
    import torch.distributed as dist

    from megatron_midtrain.data.tokenizer import load_tokenizer
    from megatron_midtrain.eval import harness
    from megatron_midtrain.eval.lm_eval_model import MegatronLM
    from megatron_midtrain.eval.scorer import Scorer

    cfg, le = trainer.cfg, trainer.cfg.lm_eval
    tokenizer = load_tokenizer(trainer.tokenizer_path)
    scorer = Scorer(trainer.model, cfg.model.vocab_size, le.max_length or cfg.data.seq_length, le.batch_tokens, trainer.device)
    results = harness.run_tasks(MegatronLM(scorer, tokenizer), list(le.tasks), num_fewshot=le.num_fewshot,
                                limit=le.limit, include_path=le.include_path, bootstrap_iters=0)
    if not dist.is_initialized() or dist.get_rank() == 0:
        results["megatron_midtrain"].update(step=trainer.step, checkpoint=None, backend="megatron (in training)")
        harness.write_results(results, os.path.join(trainer.run_dir, "eval", f"lm_eval_step{trainer.step}.json"))
    return harness.flat_metrics(results)
