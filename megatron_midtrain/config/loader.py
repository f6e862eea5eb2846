"""Turn Hydra's composed config into validated dataclasses, with one-line errors.

Hydra reports a bad override with a multi-line message and a traceback hint.
Users of a training launcher need one line that names the key and the fix, on
every rank, before any process group exists, so :func:`precheck_overrides`
composes the config once up front and translates Hydra/OmegaConf errors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import OmegaConf

from megatron_midtrain.config.schema import MidtrainConfig, register_configs
from megatron_midtrain.errors import UserError


def conf_dir() -> str:
    """The Hydra config directory: the repo's conf/, installed as the package megatron_midtrain.conf."""
    try:
        import megatron_midtrain.conf as conf_pkg  # installed layout (setup.py maps conf/ here)

        return str(Path(conf_pkg.__file__).parent)
    except ImportError:
        return str(Path(__file__).resolve().parents[2] / "conf")


def to_dataclass(cfg) -> MidtrainConfig:
    """OmegaConf node -> MidtrainConfig instance; runs every ``__post_init__`` check."""
    try:
        obj = OmegaConf.to_object(cfg)
    except UserError:
        raise
    except Exception as err:  # OmegaConf validation errors
        raise _translate(err, "") from None
    if not isinstance(obj, MidtrainConfig):
        raise UserError("the composed config is not a MidtrainConfig", "keep `midtrain_schema` first in conf/config.yaml's defaults")
    return obj


def _translate(err: Exception, override: str) -> UserError:
    # Hydra wraps the informative OmegaConf error; read the whole cause chain.
    texts, cause = [], err
    while cause is not None:
        texts.append(str(cause))
        cause = cause.__cause__
    text = "\n".join(texts)
    key = None
    for pattern in (r"Could not override '([^']+)'", r"Key '([^']+)' not in '", r"Key '([^']+)' is not in struct", r"full_key: (\S+)"):
        match = re.search(pattern, text)
        if match:
            key = match.group(1)
            break
    missing_group = re.search(r"Could not find '([^'/]+)/([^']+)'", text) or re.search(r"In '[^']+': Could not find '([^'/]+)/([^']+)'", text)
    if missing_group:
        group, name = missing_group.groups()
        return UserError(f"unknown {group} preset {name!r}", f"choose one of: {', '.join(_group_options(group)) or 'see conf/' + group}")
    if "not in struct" in text or "Could not override" in text or "not in '" in text:
        return UserError(
            f"unknown config key {key!r}" + (f" in override {override!r}" if override else ""),
            "check the spelling (`midtrain --cfg job` prints every key), or prefix with + only for hydra keys",
        )
    lines = [line.strip() for t in texts[1:] + texts[:1] for line in t.splitlines() if line.strip()]
    first = lines[0] if lines else type(err).__name__
    where = f" for {key}" if key else ""
    return UserError(f"invalid config value{where}: {first}" + (f" (override {override!r})" if override else ""), "fix the value to match the type in megatron_midtrain/config/schema.py")


def _group_options(group: str) -> list[str]:
    """Names selectable for a config group (YAML files and ConfigStore entries)."""
    from hydra.core.global_hydra import GlobalHydra

    try:
        return sorted(GlobalHydra.instance().config_loader().get_group_options(group))
    except Exception:  # not inside an initialised Hydra context
        return []


def _user_overrides(argv: list[str]) -> list[str] | None:
    """Overrides to pre-check, or None when Hydra should handle the command line alone."""
    if any(a in ("-m", "--multirun", "--help", "-h", "--hydra-help", "--info", "--cfg", "-c", "--shell-completion") or a.startswith(("--cfg=", "--info=")) for a in argv):
        return None  # multirun expands sweeps; the launcher re-validates each job
    overrides = [a for a in argv if not a.startswith("-")]
    return [a for a in overrides if not a.lstrip("+~").startswith("hydra")]


def precheck_overrides(argv: list[str]) -> None:
    """Compose the config once with the user's overrides; raise one-line UserError on failure."""
    overrides = _user_overrides(argv)
    if overrides is None:
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            try:
                cfg = compose(config_name="config", overrides=overrides)
            except Exception as err:
                bad = next((o for o in overrides if o.split("=")[0].lstrip("+~") in str(err)), "")
                raise _translate(err, bad) from None
            to_dataclass(cfg)
    finally:
        GlobalHydra.instance().clear()


def load_config(overrides: list[str] | None = None) -> MidtrainConfig:
    """Compose + validate without Hydra's app machinery (tests, notebooks, tools)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            try:
                cfg = compose(config_name="config", overrides=list(overrides or []))
            except Exception as err:
                raise _translate(err, "") from None
            return to_dataclass(cfg)
    finally:
        GlobalHydra.instance().clear()


os.environ.setdefault("HYDRA_FULL_ERROR", "0")
