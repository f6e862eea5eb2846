"""CPU compatibility layer for megatron-core 0.16 (active only without CUDA).

Why this exists: megatron-core assumes a GPU in a handful of places that are
pure bookkeeping (scratch tensors created with ``device="cuda"``,
``torch.cuda.current_device()`` for p2p shape buffers, ``torch.cuda.synchronize``
in dist-checkpointing, CUDA RNG tracker calls). The maths itself is device
agnostic. So that the *real* code path (GPTModel, pipeline schedules, DDP,
optimizer, dist_checkpointing) runs in CPU tests and the embedded demo, we swap
the module-global name ``torch`` in an explicit, version-pinned list of
megatron-core modules for a proxy that maps CUDA device requests to the CPU.

Rules:
* nothing is patched when CUDA is available (``activate()`` is a no-op);
* only the modules in :data:`PATCHED_MODULES` see the proxy, never torch itself
  or user code;
* megatron-core is never forked or vendored; if the installed version is not
  the pinned one the layer refuses to run rather than guess.

The one non-bookkeeping replacement is gradient clipping: megatron's
``clip_grad_by_total_norm_fp32`` asserts ``torch.cuda.FloatTensor`` grads, so
the optimizer module gets a device-agnostic version (same formula).
"""

from __future__ import annotations

import contextlib
import importlib
import types

import torch

from megatron_midtrain.errors import UserError

#: megatron-core minor versions this layer has been verified against.
SUPPORTED_MCORE_VERSIONS = ("0.16.",)

#: Modules whose global ``torch`` is replaced by the CPU proxy. Each entry was
#: needed by a concrete failure in 0.16.1 (see tests/test_cpu_compat.py).
PATCHED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens = zeros(device="cuda")
    "megatron.core.pipeline_parallel.p2p_communication",  # shape buffers on current_device()
    "megatron.core.optimizer.clip_grads",  # norm scratch tensors on "cuda"
    "megatron.core.optimizer.optimizer",  # found_inf / scale tensors on "cuda"
    "megatron.core.utils",  # local_multi_tensor_l2_norm returns a "cuda" tensor
    "megatron.core.distributed.param_and_grad_buffer",  # buffers on current_device()
    "megatron.core.distributed.distributed_data_parallel",  # streams / synchronize
    "megatron.core.distributed.finalize_model_grads",  # token-count all-reduce buffers
    "megatron.core.tensor_parallel.random",  # CUDA RNG tracker -> CPU generator
    "megatron.core.tensor_parallel.mappings",  # TP gather buffers (inference logits) on current_device()
    "megatron.core.tensor_parallel.layers",  # sequence-parallel all-gather buffers on current_device()
    "megatron.core.transformer.attention",  # inference buffers on current_device()
    "megatron.core.models.common.embeddings.rotary_pos_embedding",  # inv_freq.to(current_device())
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.async_utils",  # async save: cuda.synchronize, done-flag all-reduce
)

_CUDA_PREFIX = "cuda"


def _cpu_device(device):
    """Map any CUDA device spec (str, int, torch.device) to the CPU; leave others."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith(_CUDA_PREFIX):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _redirect_device(fn):
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    wrapper.__name__ = getattr(fn, "__name__", "wrapper")
    return wrapper


class _CpuStream:
    """Stand-in for torch.cuda.Stream: work is synchronous on the CPU."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event


class _CpuEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass


def _build_cuda_namespace() -> types.SimpleNamespace:
    ns = types.SimpleNamespace(
        is_available=lambda: False,
        current_device=lambda: torch.device("cpu"),
        device_count=lambda: 0,
        synchronize=lambda *a, **k: None,
        empty_cache=lambda: None,
        set_device=lambda *a, **k: None,
        current_stream=lambda *a, **k: _CpuStream(),
        default_stream=lambda *a, **k: _CpuStream(),
        Stream=_CpuStream,
        Event=_CpuEvent,
        stream=lambda *a, **k: contextlib.nullcontext(),
        # The RNG tracker keeps named generator states; on the CPU these are the
        # CPU generator's states, which is what fork()/set_rng_state need.
        get_rng_state=lambda *a, **k: torch.get_rng_state(),
        set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
        manual_seed=lambda seed: torch.manual_seed(seed),
        memory_allocated=lambda *a, **k: 0,
        max_memory_allocated=lambda *a, **k: 0,
        nvtx=types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None),
    )
    ns.random = types.SimpleNamespace(get_rng_state=ns.get_rng_state, set_rng_state=ns.set_rng_state)
    return ns


class _CpuTorchProxy(types.ModuleType):
    """A ``torch`` look-alike whose tensor factories and ``cuda`` namespace target the CPU."""

    _FACTORIES = (
        "zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand",
        "zeros_like", "ones_like", "empty_like", "full_like", "as_tensor",
    )

    def __init__(self):
        super().__init__("torch")
        self.cuda = _build_cuda_namespace()
        for name in self._FACTORIES:
            setattr(self, name, _redirect_device(getattr(torch, name)))

    def __getattr__(self, name):  # everything else is the real torch
        return getattr(torch, name)


def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Device-agnostic twin of megatron's ``clip_grad_by_total_norm_fp32`` (same formula)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = []
    for param in parameters:
        grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if grad is not None:
            grads.append(grad.detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def _l2_norm_fp64_accumulated(chunk_size, noop_flag, tensor_lists, per_tensor, *args):  # noqa: ARG001
    """Drop-in for megatron's local ``multi_tensor_l2norm`` fallback (used without apex/TE), which
    takes an fp32 ``torch.norm`` per tensor. On the CPU that is off by up to ~1e-4 relative on large
    gradients (measured 6.6e-5 on the demo's tied-embedding gradient), and since every TP rank
    norms its own shard, the gradient-clipping factor then differed by ~1.5e-5 between TP1 and TP2
    (the fixed-rollout GRPO/RMT parity cells, issue 12). Squares are accumulated in fp64."""
    squares = [torch.linalg.vector_norm(t, dtype=torch.float64).square() for ts in tensor_lists for t in ts]
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros((), dtype=torch.float64)
    return total.float().reshape(1), None


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    """Within the block, ``Tensor.cuda()`` returns the tensor itself (CPU)."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _wrap_method(cls, name: str) -> None:
    """Run ``cls.name`` with ``Tensor.cuda`` as identity (for methods that call ``.cuda()``)."""
    original = getattr(cls, name)

    def wrapper(*args, **kwargs):
        with _tensor_cuda_is_identity():
            return original(*args, **kwargs)

    wrapper.__wrapped__ = original
    setattr(cls, name, wrapper)


#: (module, class, method) that call ``tensor.cuda()`` directly, which no module proxy can catch.
CUDA_METHOD_CALLS = (
    # all-reduce of the tied embedding between the first and last pipeline stage
    ("megatron.core.models.common.language_module.language_module", "LanguageModule", "setup_embeddings_and_output_layer"),
)

_ACTIVE = False


def megatron_core_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def activate(force: bool = False) -> bool:
    """Install the CPU proxies when CUDA is absent. Returns True when active.

    Idempotent. ``force`` is for tests that want the layer even on a GPU box.
    """
    global _ACTIVE
    if _ACTIVE:
        return True
    if torch.cuda.is_available() and not force:
        return False
    version = megatron_core_version()
    if not version.startswith(SUPPORTED_MCORE_VERSIONS):
        raise UserError(
            f"the CPU path is verified only for megatron-core {SUPPORTED_MCORE_VERSIONS[0]}x, found {version}",
            "pip install 'megatron-core==0.16.1' for CPU runs (newer versions are for GPU images)",
        )
    proxy = _CpuTorchProxy()
    for name in PATCHED_MODULES:
        module = importlib.import_module(name)
        module.torch = proxy
    for module_name, cls_name, method in CUDA_METHOD_CALLS:
        _wrap_method(getattr(importlib.import_module(module_name), cls_name), method)
    opt_module = importlib.import_module("megatron.core.optimizer.optimizer")
    opt_module.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    clip_module = importlib.import_module("megatron.core.optimizer.clip_grads")
    if clip_module.l2_norm_impl is importlib.import_module("megatron.core.utils").local_multi_tensor_l2_norm:
        clip_module.l2_norm_impl = _l2_norm_fp64_accumulated
    _ACTIVE = True
    return True


def is_active() -> bool:
    return _ACTIVE
