"""A frozen reference model co-located with the policy (same processes, same TP/PP sharding).

Scheduling: before the policy's forward/backward of a step, the reference runs its
own *forward-only pass of megatron's pipeline schedule* over the same micro-batches.
Its last stage keeps only what the method needs per micro-batch (the target-token
log-probs, ``[mbs, seq]`` fp32), which the policy's last stage then reads in its loss.

Why a separate pass rather than interleaving the reference inside the policy's
forward step: with PP > 1 the reference's activations have to travel through the
pipeline exactly like the policy's, and megatron's schedule only moves one model's
activations. A forward-only pass re-uses the schedule as is (no activation memory
kept, no backward), works for any TP/PP, and its output is tiny. The price is one
extra pipeline fill/drain per step, which shrinks with more micro-batches.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_midtrain.errors import UserError
from megatron_midtrain.losses.vocab_parallel import label_logprobs
from megatron_midtrain.model.builder import build_transformer_config
from megatron_midtrain.model.loading import load_frozen_stage
from megatron_midtrain.training import checkpoint as ckpt
from megatron_midtrain.training.forward import forward_only
from megatron_midtrain.training.checkpoint import resolve_checkpoint_dir  # noqa: F401  (re-export for tools)


class ColocatedReference:
    """Frozen GPTModel stage: no gradients, no optimizer state, always in eval mode."""

    def __init__(self, cfg, policy_tokenizer_id: str | None, dtype: torch.dtype, use_te: bool):
        self.cfg = cfg
        self.path = ckpt.resolve_checkpoint_dir(cfg.reference.checkpoint, what="reference.checkpoint")
        self.config = build_transformer_config(cfg.model, cfg.parallel, dtype)
        if cfg.reference.fp8:
            if not (use_te and torch.cuda.is_available()):
                raise UserError("reference.fp8=true needs a GPU with Transformer Engine", "set reference.fp8=false")
            # TE's layers read config.fp8 at forward time (megatron wraps the block in its fp8 context).
            self.config = dataclasses.replace(self.config, fp8="e4m3", fp8_recipe="delayed")
        # The reference must score exactly the policy's tokens: same architecture (so the same
        # sharding and vocabulary, checked while loading) and the same tokenizer.
        self.model, meta = load_frozen_stage(self.path, cfg.model, self.config, cfg.data.seq_length, use_te, what="reference")
        saved_tok = meta.get("tokenizer")
        if saved_tok and policy_tokenizer_id and saved_tok != policy_tokenizer_id:
            raise UserError(
                f"reference {self.path} was trained with tokenizer {saved_tok}, the policy uses {policy_tokenizer_id}",
                "use a reference that shares the policy's tokenizer",
            )
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self._hidden_only = False
        self._output_weight = None

    def _forward_only(self, micro_batches, num_microbatches: int, device, score_fn):
        """The forward-only pass over the corpus micro-batches (the RL step runs its rollout
        batches through ``self.model`` with their own shapes)."""
        return forward_only(self.model, micro_batches, num_microbatches, score_fn, seq_length=self.cfg.data.seq_length,
                            micro_batch_size=self.cfg.train.micro_batch_size, device=device)

    @torch.no_grad()
    def target_logprobs(self, micro_batches, num_microbatches: int, device) -> list:
        """Reference log-probs of each micro-batch's labels, on the last stage (None elsewhere)."""
        if self._hidden_only:
            raise RuntimeError("this reference serves final hidden states (KD); it has no output layer in its forward")
        return self._forward_only(micro_batches, num_microbatches, device, label_logprobs)

    @torch.no_grad()
    def final_hidden(self, micro_batches, num_microbatches: int, device) -> list:
        """Reference hidden states before the output layer ([b, s, h]) per micro-batch, on the last stage.

        For full-distribution methods (KD): hidden states are vocab/hidden times smaller than
        logits, so they are what is kept between the reference pass and the policy's loss, where
        :meth:`logits_from_hidden` turns one micro-batch at a time into a logits shard.
        """
        if not self._hidden_only:
            self._stop_before_output_layer()
        return self._forward_only(micro_batches, num_microbatches, device, _batch_major)

    def _stop_before_output_layer(self) -> None:
        """From now on this reference's forward returns the final hidden states.

        megatron's GPTModel returns the decoder's output (after the final norm) when
        ``post_process`` is off; its output layer and (tied) weight stay for
        :meth:`logits_from_hidden`, which applies them one micro-batch at a time. A reference
        serves one method, so this is set once, not toggled per call.
        """
        model = self.model
        self._output_weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        model.post_process = False
        self._hidden_only = True

    @torch.no_grad()
    def logits_from_hidden(self, hidden):
        """[b, s, h] reference hidden states -> [b, s, V/tp] logits shard (reference output layer)."""
        logits, _ = self.model.output_layer(hidden.transpose(0, 1), weight=self._output_weight)
        return logits.transpose(0, 1)


def _batch_major(batch, hidden):  # noqa: ARG001
    """[s, b, h] -> [b, s, h] (the layout of the logits the policy's loss receives)."""
    return hidden.transpose(0, 1).contiguous()
