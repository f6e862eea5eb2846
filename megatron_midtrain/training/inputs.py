"""Per-micro-batch inputs a method declares beyond the data (``method.inputs``).

A corpus method names, in order, the inputs its loss reads; :class:`~megatron_midtrain.training.corpus_step.CorpusStep`
runs each provider before the step's forward/backward and merges what it returns into the
micro-batches. Adding a method that needs something new means adding one provider here.

* ``reference_logprobs``: the frozen reference's target-token log-probs (``ref_logprobs``,
  ``[mbs, seq]`` fp32 on the last stage), co-located or from the offline store (ReMiT, RHO-1);
* ``reference_hidden``: the reference's final hidden states and the function that turns them
  into a logits shard (``ref_hidden``, ``ref_logits_fn``) for full-distribution losses (KD);
* ``policy_prepass``: a forward-only policy pass that scores every token of the global batch
  (``method.score``), then ``method.select`` turns the scores into per-micro-batch inputs
  (RHO-1's global top-k).
"""

from __future__ import annotations

from megatron.core import parallel_state



def reference_logprobs(step, batches, step_index: int, extras: list[dict]) -> None:
    ref = step.reference.target_logprobs(batches.iterator(step_index), batches.num_microbatches, step.device)
    for extra, r in zip(extras, ref):
        extra["ref_logprobs"] = r


def reference_hidden(step, batches, step_index: int, extras: list[dict]) -> None:
    reference = step.reference
    hidden = reference.final_hidden(batches.iterator(step_index), batches.num_microbatches, step.device)
    for extra, h in zip(extras, hidden):
        extra["ref_hidden"] = h
        extra["ref_logits_fn"] = reference.logits_from_hidden


def policy_prepass(step, batches, step_index: int, extras: list[dict]) -> None:
    method = step.method
    tp_group = parallel_state.get_tensor_model_parallel_group()

    def score(batch, logits):
        return method.score(logits, batch["labels"], batch["loss_mask"], batch, tp_group)

    micro_batches = (dict(b, **e) for b, e in zip(batches.iterator(step_index), extras))
    scores = step.forward_only(micro_batches, batches.num_microbatches, score)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        masks = [b["loss_mask"] for b in batches.iterator(step_index)]
        for extra, sel in zip(extras, method.select(scores, masks, parallel_state.get_data_parallel_group())):
            extra.update(sel)


#: name -> provider(step, batches, step_index, extras); extras are filled in place.
INPUTS = {"reference_logprobs": reference_logprobs, "reference_hidden": reference_hidden, "policy_prepass": policy_prepass}
