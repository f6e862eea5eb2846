"""Entry point: ``python -m megatron_midtrain.train [overrides]``, ``midtrain``, or under torchrun.

Build, train, close. Everything else lives in megatron_midtrain/training/.
"""

from __future__ import annotations

import sys

import hydra

from megatron_midtrain.utils.quiet import silence_known_warnings

silence_known_warnings()

from megatron_midtrain.config.loader import conf_dir, precheck_overrides, to_dataclass
from megatron_midtrain.config.schema import register_configs
from megatron_midtrain.errors import exit_on_user_error  # noqa: E402

register_configs()


@hydra.main(config_path=conf_dir(), config_name="config", version_base=None)
@exit_on_user_error  # inside Hydra too: its own handler would print a multi-line report
def _run(cfg) -> None:
    from megatron_midtrain.training.demo_models import with_demo_models
    from megatron_midtrain.training.trainer import Trainer

    trainer = Trainer(with_demo_models(to_dataclass(cfg)))
    try:
        trainer.train()
    finally:
        trainer.close()


@exit_on_user_error
def main() -> None:
    precheck_overrides(sys.argv[1:])
    _run()


if __name__ == "__main__":
    main()
