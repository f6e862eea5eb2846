"""megatron_midtrain: Megatron-core based LLM mid-training (NTP, ReMiT, RMT)."""

from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).with_name("README.md")

setup(
    name="megatron_midtrain",
    version="0.1.0",
    description="Megatron-core mid-training: ReMiT token reweighting and RMT entropy-curriculum GRPO",
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_midtrain", "megatron_midtrain.*"]) + ["megatron_midtrain.conf"],
    # conf/ lives at the top of the repo (SPEC layout) and is installed as megatron_midtrain.conf
    # so that a non-editable install still finds its Hydra configs.
    package_dir={"megatron_midtrain.conf": "conf"},
    package_data={"megatron_midtrain.conf": ["*.yaml", "*/*.yaml", "*/*/*.yaml"]},
    include_package_data=True,
    install_requires=[
        # CPU / CI: install torch==2.13.0 first (README) so pip never pulls a CUDA build.
        "torch>=2.4",
        # 0.16.1 is the newest release for Python 3.11 and the one the CPU layer is pinned to;
        # GPU images (Python 3.12) may carry a newer megatron-core.
        "megatron-core==0.16.1; python_version < '3.12'",
        "megatron-core>=0.16.1; python_version >= '3.12'",
        "hydra-core>=1.3.2,<1.4",
        "omegaconf>=2.3",
        "sentencepiece>=0.2",
        "numpy>=1.24",
        "psutil>=5.9",  # megatron-core dist_checkpointing needs it
        "matplotlib>=3.7",  # metrics.png
        "pyyaml>=6.0",
    ],
    extras_require={
        # Needs a CUDA build; the NGC PyTorch image already brings it (see Dockerfile).
        "gpu": ["transformer-engine>=2.0"],
        # HF checkpoint conversion + tokenizer.json (SmolLM3 needs transformers >= 4.54).
        "hf": ["transformers>=4.54", "tokenizers>=0.20", "safetensors>=0.4"],
        # lm-evaluation-harness (tools/evaluate.py, lm_eval.tasks during training); accelerate is
        # what the harness's own "hf" model class imports.
        "eval": ["lm_eval>=0.4.8,<0.5", "accelerate>=1.0"],
        "slurm": ["hydra-submitit-launcher==1.2.0"],
        "tensorboard": ["tensorboard>=2.14"],
        # run.wandb.project=... (megatron_midtrain/callbacks/wandb.py); tested with 0.31.0
        "wandb": ["wandb>=0.17"],
        "dev": ["pytest>=8", "tokenizers>=0.20", "pyyaml>=6.0", "transformers>=4.54", "safetensors>=0.4", "lm_eval>=0.4.8,<0.5", "accelerate>=1.0",
                "wandb>=0.17"],
    },
    entry_points={"console_scripts": ["midtrain=megatron_midtrain.train:main"]},
)
