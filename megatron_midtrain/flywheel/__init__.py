"""The flywheel benchmark (benchmarks/flywheel.py): base -> RL reference -> mid-training with each
method x seed -> the same post-training -> evaluation, every stage cached and resumable."""
