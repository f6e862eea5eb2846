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
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_midtrain.errors import UserError
from megatron_midtrain.losses.vocab_parallel import vocab_parallel_logprobs
from megatron_midtrain.model.builder import build_gpt_stage, build_transformer_config
from megatron_midtrain.training import checkpoint as ckpt
from megatron_midtrain.training.data import to_device
from megatron_midtrain.training.checkpoint import resolve_checkpoint_dir  # noqa: F401  (re-export for tools)


class ColocatedReference:
    """Frozen GPTModel stage: no gradients, no optimizer state, always in eval mode."""

    def __init__(self, cfg, policy_tokenizer_id: str | None, dtype: torch.dtype, use_te: bool):
        from megatron_midtrain.model.loading import load_frozen_stage

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

    def _forward_step(self, device, data_iterator, model):
        batch = to_device(next(data_iterator), device)
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
        return output, partial(self._collect, batch["labels"])

    @staticmethod
    def _collect(labels, logits, non_loss_data=False):
        if non_loss_data:  # final_hidden(): the "logits" are the pre-output-layer hidden states
            return logits
        logp = vocab_parallel_logprobs(logits, labels, parallel_state.get_tensor_model_parallel_group())
        return logp.sum() * 0.0, torch.zeros((), dtype=torch.int, device=logp.device), {"ref_logprobs": logp}

    def _forward_only(self, micro_batches, num_microbatches: int, device, collect_non_loss_data: bool = False):
        """One forward-only pass of megatron's pipeline schedule over the step's micro-batches."""
        return get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, device),
            data_iterator=micro_batches,
            model=[self.model],
            num_microbatches=num_microbatches,
            seq_length=self.cfg.data.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size,
            decoder_seq_length=self.cfg.data.seq_length,
            forward_only=True,
            collect_non_loss_data=collect_non_loss_data,
        )

    @torch.no_grad()
    def target_logprobs(self, micro_batches, num_microbatches: int, device) -> list:
        """Reference log-probs of each micro-batch's labels, on the last stage (None elsewhere)."""
        out = self._forward_only(micro_batches, num_microbatches, device)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return [o["ref_logprobs"] for o in out]
        return [None] * num_microbatches

    @torch.no_grad()
    def final_hidden(self, micro_batches, num_microbatches: int, device) -> list:
        """Reference hidden states before the output layer ([b, s, h]) per micro-batch, on the last stage.

        For full-distribution methods (KD): hidden states are vocab/hidden times smaller than
        logits, so they are what is kept between the reference pass and the policy's loss, where
        :meth:`logits_from_hidden` turns one micro-batch at a time into a logits shard.
        """
        layer = getattr(self.model, "output_layer", None)
        if layer is not None:
            layer.forward = lambda hidden, weight=None, runtime_gather_output=None: (hidden, None)
        try:
            out = self._forward_only(micro_batches, num_microbatches, device, collect_non_loss_data=True)
        finally:
            if layer is not None:
                del layer.forward  # back to the class's forward
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return list(out)
        return [None] * num_microbatches

    @torch.no_grad()
    def logits_from_hidden(self, hidden):
        """[b, s, h] reference hidden states -> [b, s, V/tp] logits shard (reference output layer)."""
        weight = self.model.shared_embedding_or_output_weight() if self.model.share_embeddings_and_output_weights else None
        logits, _ = self.model.output_layer(hidden.transpose(0, 1), weight=weight)
        return logits.transpose(0, 1)
