"""Training objectives. Importing this package registers every method."""

from megatron_midtrain.losses import kd, ntp, remit, rho1  # noqa: F401  (register the methods)
from megatron_midtrain.rl import method as _rl_methods  # noqa: F401,E402  (registers rmt, grpo)
from megatron_midtrain.losses.base import build_method, register_method  # noqa: F401
