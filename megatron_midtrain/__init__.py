"""megatron_midtrain: Megatron-core mid-training (NTP, ReMiT, RMT)."""

__version__ = "0.1.0"
