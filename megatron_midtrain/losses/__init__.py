"""Training objectives. Importing this package registers every method."""

from megatron_midtrain.losses import ntp, remit  # noqa: F401  (register "ntp", "remit")
from megatron_midtrain.losses.base import build_method, register_method  # noqa: F401
