"""Named lm-evaluation-harness task suites.

``remit_fewshot``: the ReMiT paper's few-shot suite for pre-/mid-trained base models
(arXiv 2602.03075, appendix D.3): GSM8K 8-shot, Minerva Math 4-shot, GPQA 5-shot, BBH 3-shot
CoT, IFEval 3-shot, HumanEval 0-shot, MBPP 3-shot, TruthfulQA 3-shot, ARC-Challenge 25-shot
and MMLU-Pro 5-shot. The right-hand names are lm-evaluation-harness (0.4.x) task / group
names; the paper does not name harness tasks, so the choice of variant (e.g. ``gpqa_main``
vs ``gpqa_diamond``, TruthfulQA MC2) is ours. These tasks download their datasets from the
Hugging Face Hub; HumanEval and MBPP execute generated code (``--confirm-unsafe-code``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    task: str
    num_fewshot: int | None
    paper_name: str
    runs_code: bool = False


PRESETS: dict[str, list[TaskSpec]] = {
    "remit_fewshot": [
        TaskSpec("gsm8k", 8, "GSM8K"),
        TaskSpec("minerva_math", 4, "Minerva Math"),
        TaskSpec("gpqa_main_n_shot", 5, "GPQA"),
        TaskSpec("bbh_cot_fewshot", 3, "BigBenchHard (CoT)"),
        TaskSpec("ifeval", 3, "IFEval"),
        TaskSpec("humaneval", 0, "HumanEval", runs_code=True),
        TaskSpec("mbpp", 3, "MBPP", runs_code=True),
        TaskSpec("truthfulqa_mc2", 3, "TruthfulQA"),
        TaskSpec("arc_challenge", 25, "ARC-Challenge"),
        TaskSpec("mmlu_pro", 5, "MMLU-Pro"),
    ],
}


def resolve_tasks(tasks: list[str], num_fewshot: int | None) -> list[TaskSpec]:
    """Expand preset names (``preset:remit_fewshot`` or just ``remit_fewshot``) into task specs;
    other names are lm-eval tasks run with ``num_fewshot`` (None = the task's default)."""
    out: list[TaskSpec] = []
    for name in tasks:
        key = name.split(":", 1)[1] if name.startswith("preset:") else name
        if key in PRESETS:
            out.extend(PRESETS[key])
        else:
            out.append(TaskSpec(name, num_fewshot, name))
    return out
