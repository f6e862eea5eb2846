"""Evaluation: per-token log-probs under TP/PP (:mod:`.scorer`), an lm-evaluation-harness model
class on top of it (:mod:`.lm_eval_model`), task presets (:mod:`.presets`), the runner
used by ``tools/evaluate.py`` and the in-training hook (:mod:`.harness`), and single-process
per-token log-probs of a saved checkpoint for the offline tools (:mod:`.checkpoint_logprobs`)."""
