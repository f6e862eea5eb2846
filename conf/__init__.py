# Makes conf/ importable as the package ``megatron_midtrain.conf`` (see setup.py) so that an
# installed (non-editable) package still finds its Hydra configs.
