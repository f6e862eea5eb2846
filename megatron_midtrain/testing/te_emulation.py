"""Transformer Engine's layer spec, emulated on the CPU, for checkpoint-portability tests.

Transformer Engine (TE) needs CUDA, so a CPU test cannot build the TE spec's GPTModel. What a
checkpoint of that model contains is nevertheless decided by code we *can* run:

* the **structure** (which submodule is fused with which norm, where the norms live) comes
  from megatron-core's own ``get_gpt_layer_with_transformer_engine_spec`` as our builder calls
  it (``build_layer_spec(model, use_te=True)``, OLMo-2's unfused TE linears included);
* the **sharded keys and their sharding** come from megatron's own TE wrappers'
  ``sharded_state_dict`` methods. Without TE, ``megatron.core.extensions.transformer_engine``
  defines each wrapper class on a ``MagicMock`` base; the metaclass call that creates it keeps
  the class body as the mock's return value, so the real methods are recovered from there
  (:func:`megatron_te_method`) and installed on the stand-ins below.

Each megatron TE wrapper is replaced by a CPU stand-in built on megatron's local layer of the
same role, with TE's parameter names and an ``_extra_state``:

==================================  ===========================================================
megatron TE wrapper                  stand-in
==================================  ===========================================================
``TELayerNormColumnParallelLinear``  ColumnParallelLinear + fused RMSNorm ``layer_norm_weight``
``TEColumnParallelLinear``           ColumnParallelLinear
``TERowParallelLinear``              RowParallelLinear
``TEDotProductAttention``            our SDPA core attention
``TENorm`` (final norm, QK-norm)     a plain ``torch.nn.Module`` RMSNorm (TE's is not a
                                     MegatronModule, so megatron checkpoints it by default rules)
==================================  ===========================================================

Every stand-in returns a non-empty ``_extra_state`` (a pickled dict in a uint8 tensor, TE 2.x's
format for FP8 metadata): the worst case for portability. ``set_extra_state`` refuses ``None``
(what a local-spec checkpoint stores), which real TE would silently accept, so a test proves
the loader never depends on that.

What only a GPU run with real TE can verify: TE's exact ``_extra_state`` payloads and which TE
modules have one (this depends on the TE version), TE's numerics (fused kernels, bf16), and that
TE itself accepts the loaded state dict.
"""

from __future__ import annotations

import pickle
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megatron_midtrain.model.sdpa_attention import SDPAttention

#: Names of megatron's TE wrappers replaced by stand-ins.
WRAPPERS = ("TELayerNormColumnParallelLinear", "TEColumnParallelLinear", "TERowParallelLinear",
            "TEDotProductAttention", "TENorm")


def megatron_te_method(wrapper: str, method: str):
    """megatron's own ``<wrapper>.<method>`` function, recovered from its mock-based definition."""
    import megatron.core.extensions.transformer_engine as te_ext

    if te_ext.HAVE_TE:
        raise RuntimeError("Transformer Engine is importable: test the real TE spec, not the emulation")
    namespace = getattr(getattr(te_ext, wrapper), "_mock_return_value", None)
    if not isinstance(namespace, dict) or method not in namespace:
        raise RuntimeError(f"cannot recover megatron's {wrapper}.{method} (megatron-core changed how it defines "
                           "TE wrappers without TE); update megatron_midtrain/testing/te_emulation.py")
    return namespace[method]


class _ExtraState:
    """TE-style ``_extra_state``: a uint8 tensor holding pickled (FP8) metadata."""

    def _init_extra_state(self) -> None:
        self.extra_state_loaded = None  # what set_extra_state received (tests inspect it)
        # megatron's local linears add a load pre-hook that fills a missing _extra_state with
        # None; TE's modules have no such hook, so the stand-ins drop it.
        self._load_state_dict_pre_hooks.clear()

    def get_extra_state(self) -> torch.Tensor:
        payload = pickle.dumps({"emulated_te_module": type(self).__name__, "fp8_meta": [1.0, 2.0]})
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"{type(self).__name__}.set_extra_state got {type(state).__name__}; the loader must "
                            "not hand a local-spec checkpoint's empty extra state to a TE module")
        self.extra_state_loaded = pickle.loads(state.numpy().tobytes())


class _TEWrapper(_ExtraState):
    """A stand-in for a megatron TE wrapper: megatron's ``sharded_state_dict`` of those reads
    ``self._tp_group``; every one carries an ``_extra_state``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tp_group = parallel_state.get_tensor_model_parallel_group()
        self._init_extra_state()


class TELayerNormColumnParallelLinear(_TEWrapper, ColumnParallelLinear):
    """RMSNorm (weight ``layer_norm_weight``) fused in front of a column-parallel linear."""

    sharded_state_dict = megatron_te_method("TELayerNormColumnParallelLinear", "sharded_state_dict")

    def __init__(self, input_size, output_size, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
        self.layer_norm_weight.sequence_parallel = config.sequence_parallel

    def forward(self, x):
        return super().forward(F.rms_norm(x, (x.shape[-1],), self.layer_norm_weight, self.eps))


class TEColumnParallelLinear(_TEWrapper, ColumnParallelLinear):
    sharded_state_dict = megatron_te_method("TEColumnParallelLinear", "sharded_state_dict")


class TERowParallelLinear(_TEWrapper, RowParallelLinear):
    sharded_state_dict = megatron_te_method("TERowParallelLinear", "sharded_state_dict")


class TEDotProductAttention(_TEWrapper, SDPAttention):
    # megatron's version checkpoints nothing unless the softmax offset is learnable: the
    # module's _extra_state is in state_dict() but never in the checkpoint.
    sharded_state_dict = megatron_te_method("TEDotProductAttention", "sharded_state_dict")


class TENorm(_ExtraState, torch.nn.Module):
    """TE's RMSNorm: a plain module with ``weight`` (megatron checkpoints it replicated)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel
        self._init_extra_state()

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


STAND_INS = {name: globals()[name] for name in WRAPPERS}


@contextmanager
def emulated_te_spec(trainer: bool = True):
    """Within the block, ``use_te=True`` builds the TE spec with the CPU stand-ins (and, with
    ``trainer``, the Trainer believes TE is available). Restores everything on exit."""
    import megatron.core.extensions.transformer_engine as te_ext
    import megatron.core.extensions.transformer_engine_spec_provider as provider
    import megatron.core.models.gpt.gpt_layer_specs as specs
    import megatron.core.transformer.transformer_block as block

    patches = [(mod, name, cls) for mod in (te_ext, provider) for name, cls in STAND_INS.items()]
    # TESpecProvider asks the TE version before picking TENorm for QK-norm (>= 1.9 does).
    patches.append((provider, "is_te_min_version", lambda *args, **kwargs: True))
    # gpt_layer_specs imports the provider only when TE imports.
    patches.append((specs, "TESpecProvider", provider.TESpecProvider))
    # The block's final norm: megatron chose its class at import time (TENorm only with TE).
    patches.append((block, "LayerNormImpl", TENorm))
    if trainer:
        import megatron_midtrain.training.components as components

        patches.append((components, "have_transformer_engine", lambda: True))
    missing = object()
    saved = [(mod, name, getattr(mod, name, missing)) for mod, name, _ in patches]
    try:
        for mod, name, value in patches:
            setattr(mod, name, value)
        yield
    finally:
        for mod, name, value in saved:
            if value is missing:
                delattr(mod, name)
            else:
                setattr(mod, name, value)
