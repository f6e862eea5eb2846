"""Silence megatron-core import warnings that are expected and not actionable.

On the CPU (and on GPU images without apex) megatron-core warns at import time
that it falls back to torch implementations. Those lines bury the progress
output, so entry points filter exactly these messages and nothing else.
"""

import warnings

_EXPECTED = (
    r".*Transformer Engine and Apex are not installed.*",
    r".*Apex is not installed.*",
    r".*full scope is deprecated.*",
    r".*CUDA_DEVICE_MAX_CONNECTIONS.*",  # async TP all-reduce hint; irrelevant on the CPU
    r".*torch\.jit\.script_method.*is deprecated.*",
    r".*The following imports from `dynamic_context\.py` will be removed.*",
)


#: Modules whose FutureWarnings (torch.distributed.checkpoint deprecations that megatron's
#: dist_checkpointing triggers while loading) are not ours to act on.
_FUTURE_WARNING_MODULES = (r"torch\.distributed\.checkpoint.*", r"megatron\.core\.dist_checkpointing.*")


def silence_known_warnings() -> None:
    for pattern in _EXPECTED:
        warnings.filterwarnings("ignore", message=pattern)
    for module in _FUTURE_WARNING_MODULES:
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
