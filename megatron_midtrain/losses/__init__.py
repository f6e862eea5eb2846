"""Training objectives. Importing this package registers every method."""

from megatron_midtrain.losses import ntp  # noqa: F401  (registers "ntp")
from megatron_midtrain.losses.base import build_method, register_method  # noqa: F401
