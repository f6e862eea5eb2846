r"""Next-token reasoning prompts for RMT (SPEC §3 "Rollouts"; RPT-style).

Each selected position t becomes a prompt made of the context (the text before the target
token), an instruction, and the current token budget :math:`B_t`. The template is a Python
``str.format`` string with the fields:

* ``{context}`` — the context text (required);
* ``{budget}`` — the token budget :math:`B_t` (an int);
* ``{answer_hint}`` — optional; the phrase telling the model how to format its answer,
  which depends on ``answer_format`` (so a template does not need to escape ``\boxed{}``).

Literal braces in a custom template must be doubled (``{{`` / ``}}``), as in ``str.format``.
The context is a value, not part of the template, so braces in it are safe.
"""

from __future__ import annotations

from megatron_midtrain.config.rl_rules import PROMPT_ANSWER_FORMATS, template_fields, validate_template  # noqa: F401

DEFAULT_TEMPLATE = (
    "Complete the text below by predicting the next token. "
    "Think step by step using about {budget} tokens, then give the predicted next token {answer_hint}.\n\n"
    "Text:\n{context}\n\n"
    "Reasoning:\n"
)

ANSWER_HINTS = {
    "answer_tag": "inside <answer></answer> tags, for example <answer> the</answer>",
    "boxed": "inside \\boxed{}, for example \\boxed{ the}",
    "answer_is": 'after "The answer is", for example The answer is the',
    "plain": "as your whole answer",
    "gsm8k": 'on a last line starting with "####", for example #### the',
    # regex: no hint (a pattern cannot be described generically); write the answer
    # instructions into the template itself, without {answer_hint}
}

def build_prompt(context: str, budget: int, template: str = DEFAULT_TEMPLATE, answer_format: str = "answer_tag") -> str:
    """The next-token reasoning prompt: ``template.format(context=..., budget=..., answer_hint=...)``.

    Args:
        context: the text before the target position (decoded from the corpus tokens).
        budget: the current token budget :math:`B_t` (see :func:`megatron_midtrain.rl.budget.token_budget`).
        template: see the module docstring.
        answer_format: ``answer_tag`` (``<answer>…</answer>``), ``boxed`` (``\\boxed{}``), ``answer_is``,
            ``plain``, ``gsm8k`` (``#### …``) or ``regex``; selects ``{answer_hint}`` and must match the
            reward's extraction format (``regex`` has no hint: its template may not use ``{answer_hint}``).
    """
    if answer_format not in PROMPT_ANSWER_FORMATS:
        raise ValueError(f"answer_format={answer_format!r} is not one of {PROMPT_ANSWER_FORMATS}")
    validate_template(template)
    if answer_format not in ANSWER_HINTS and "answer_hint" in template_fields(template):
        raise ValueError(f"answer_format={answer_format!r} has no {{answer_hint}}; describe the answer format in the template")
    return template.format(context=context, budget=int(budget), answer_hint=ANSWER_HINTS.get(answer_format, ""))
