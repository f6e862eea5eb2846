"""The method interface used on the last pipeline stage.

A method turns ``(logits shard, labels, loss mask, extras)`` into
``(loss_sum, num_tokens, report)``:

* ``loss_sum``: a scalar to back-propagate, a *sum* over this micro-batch's tokens;
  megatron's schedule adds up the micro-batches and ``finalize_model_grads``
  divides the gradients by the global token count (``calculate_per_token_loss``),
  so the optimised quantity is sum / tokens over the whole global batch.
* ``num_tokens``: int tensor, tokens that count in the denominator.
* ``report``: ``{name: tensor([sum, count])}``; the trainer sums these over
  micro-batches and data-parallel ranks and logs ``sum / count`` as ``name``.

The maths lives in pure functions (``ntp.py`` ...) on plain tensors; the classes
here only adapt them to this interface.

A method also owns what happens around its forward/backward:

* ``inputs``: the per-micro-batch inputs it needs beyond the data, by name
  (:mod:`megatron_midtrain.training.inputs`: reference log-probs, reference hidden states,
  a policy prepass), computed by the default corpus step before the schedule runs;
* optionally ``make_step(trainer)``: a step of its own instead of the corpus step (the RL
  methods' rollout step), ``check_inputs(cfg, layout, sources, tokenizer_id)`` (checks before
  anything is written) and ``callbacks(cfg)`` (extras it reports, e.g. held-out accuracy).

docs/architecture.md walks through adding a method.
"""

from __future__ import annotations

from typing import Callable, Dict, Protocol

import torch


class Method(Protocol):
    name: str
    #: What the method needs from a frozen reference: None, or "target_logprobs"
    #: (``extras["ref_logprobs"]``, ``[mbs, seq]`` fp32 on the last stage).
    needs_reference: str | None
    #: Names of the inputs (megatron_midtrain.training.inputs.INPUTS) the loss reads, in order.
    inputs: tuple[str, ...]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, extras: dict, tp_group) -> tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        ...

    def finalize_report(self, report: Dict[str, float]) -> Dict[str, float]:
        """Turn the reduced ``sum/count`` means into the logged statistics (e.g. a std)."""
        ...


_REGISTRY: Dict[str, Callable[..., Method]] = {}


def register_method(name: str):
    def deco(cls):
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def build_method(method_cfg, **context) -> Method:
    """Instantiate the registered method; ``context`` carries run facts (e.g. ``eod_id``)."""
    from megatron_midtrain.errors import UserError

    name = method_cfg.name
    if name not in _REGISTRY:
        raise UserError(f"method={name!r} is not implemented", f"choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](method_cfg, **context)


def report_entry(total: torch.Tensor, count) -> torch.Tensor:
    """A report value: [sum, count] in fp64 so sums over many micro-batches stay exact enough."""
    return torch.stack([total.detach().double().reshape(()), torch.as_tensor(count, dtype=torch.float64, device=total.device).reshape(())])
