"""Training objectives. Importing this package registers every method."""

from megatron_midtrain.losses import kd, ntp, remit, rho1  # noqa: F401  (register the methods)
from megatron_midtrain.losses.base import build_method, register_method  # noqa: F401
