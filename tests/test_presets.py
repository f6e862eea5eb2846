"""Every experiment and model preset composes and validates against the schema."""

import os

import pytest

from megatron_midtrain.config.loader import conf_dir, load_config

EXPERIMENTS = sorted(f[:-5] for f in os.listdir(os.path.join(conf_dir(), "experiment")) if f.endswith(".yaml"))
MODELS = sorted(f[:-5] for f in os.listdir(os.path.join(conf_dir(), "model")) if f.endswith(".yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_preset_composes(name):
    cfg = load_config([f"experiment={name}"])
    assert cfg.train.global_batch_tokens % cfg.data.seq_length == 0


@pytest.mark.parametrize("name", MODELS)
def test_model_preset_composes(name):
    load_config([f"model={name}"])


def test_remit_paper_recipes():
    olmo = load_config(["experiment=remit_olmo1b"])
    assert (olmo.optimizer.lr, olmo.data.seq_length, olmo.method.clip_eps, olmo.optimizer.min_lr) == (3e-4, 4096, 0.2, 1e-7)
    assert olmo.train.max_steps * olmo.train.global_batch_tokens == pytest.approx(50e9, rel=1e-4)
    youtu = load_config(["experiment=remit_youtu_2b"])
    assert youtu.train.global_batch_tokens == 64 * 2**20 and youtu.optimizer.lr == 2e-4
