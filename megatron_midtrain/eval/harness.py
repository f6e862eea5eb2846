"""Run lm-evaluation-harness tasks and store the results JSON (tool and in-training hook).

Per-task shot counts (presets) are honoured by running the harness once per distinct shot
count and merging the result dictionaries. Task names are checked against the harness's
task index (local YAML files, no network) before anything runs.
"""

from __future__ import annotations

import datetime
import json
import os
from collections import defaultdict

from megatron_midtrain.errors import UserError
from megatron_midtrain.eval.presets import PRESETS, TaskSpec, resolve_tasks


def task_manager(include_path: str | None, tasks: list[str] | None = None):
    """The harness's task index. Indexing the built-in tasks parses thousands of YAML files
    (tens of seconds on a small machine), so when every requested task is found under
    ``include_path`` alone, the built-in index is skipped."""
    from lm_eval.tasks import TaskManager

    if include_path and not os.path.isdir(include_path):
        raise UserError(f"--include-path {include_path} is not a directory", "point it at a folder of lm-eval task YAML files")
    if include_path and tasks:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in set(local.all_tasks) for t in tasks):
            return local
    return TaskManager(include_path=include_path) if include_path else TaskManager()


def check_tasks(specs: list[TaskSpec], manager) -> None:
    known = set(manager.all_tasks)
    unknown = [s.task for s in specs if s.task not in known]
    if unknown:
        raise UserError(
            f"unknown lm-eval task(s): {', '.join(unknown)}",
            f"use task names from `lm_eval --tasks list`, a preset ({', '.join(PRESETS)}), or --include-path for local tasks",
        )


def run_tasks(lm, tasks: list[str], num_fewshot: int | None = None, limit: float | None = None,
              include_path: str | None = None, bootstrap_iters: int = 100000,
              confirm_unsafe_code: bool = False, model_args: dict | None = None, manager=None) -> dict:
    """Evaluate ``lm`` (an ``lm_eval`` LM instance, or the string ``"hf"`` with ``model_args``)."""
    from lm_eval import simple_evaluate

    specs = resolve_tasks(tasks, num_fewshot)
    manager = manager or task_manager(include_path, [s.task for s in specs])
    check_tasks(specs, manager)
    if any(s.runs_code for s in specs) and not confirm_unsafe_code:
        raise UserError("the task list includes code-execution tasks (HumanEval / MBPP)",
                        "pass --confirm-unsafe-code to run them (they execute model-written code)")
    by_shots: dict[int | None, list[str]] = defaultdict(list)
    for s in specs:
        by_shots[s.num_fewshot].append(s.task)
    merged: dict = {}
    for shots, names in by_shots.items():
        out = simple_evaluate(
            model=lm, model_args=model_args, tasks=names, num_fewshot=shots, limit=limit, task_manager=manager,
            bootstrap_iters=bootstrap_iters, log_samples=False, confirm_run_unsafe_code=confirm_unsafe_code,
        )
        if out is None:  # non-zero ranks of a harness-managed distributed run
            continue
        for key, value in out.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key].update(value)
            else:
                merged.setdefault(key, value)
    merged["megatron_midtrain"] = {"tasks": [s.__dict__ for s in specs], "limit": limit}
    return merged


def flat_metrics(results: dict, prefix: str = "lm_eval/") -> dict[str, float]:
    """``{"lm_eval/<task>/<metric>": value}`` for numeric metrics (stderr omitted)."""
    flat = {}
    for task, metrics in (results.get("results") or {}).items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name:
                flat[f"{prefix}{task}/{name.split(',')[0]}"] = float(value)
    return flat


def write_results(results: dict, path: str) -> str:
    from lm_eval.utils import handle_non_serializable

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(results, fh, indent=2, default=handle_non_serializable, sort_keys=True)
    os.replace(tmp, path)
    return path


def run_dir_of(checkpoint_dir: str) -> str:
    """The run directory a checkpoint belongs to (``RUN/checkpoints/iter_N`` -> ``RUN``); an
    imported checkpoint directory is its own run directory."""
    checkpoint_dir = os.path.abspath(checkpoint_dir)
    parent = os.path.dirname(checkpoint_dir)
    if os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent)
    return checkpoint_dir


def default_results_path(checkpoint_dir: str, step) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return os.path.join(run_dir_of(checkpoint_dir), "eval", f"lm_eval_step{step}_{stamp}.json")
