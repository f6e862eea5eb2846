"""Launch tooling: SLURM sbatch/sweep scripts (dry runs), SLURM->torchrun env, launcher yaml.

All tests are CPU-only and run no training: the shell scripts are only used
with --dry-run, with fake ``srun``/``torchrun``/``python`` executables first on
PATH that leave a marker file if anything is ever executed.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow plain `pytest` from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from megatron_midtrain.utils.slurm_env import (  # noqa: E402
    expand_nodelist,
    first_host,
    master_port_from_job_id,
    torchrun_env_from_slurm,
)

SBATCH = REPO / "examples" / "slurm" / "train.sbatch"
SWEEP = REPO / "examples" / "slurm" / "sweep.sh"
LAUNCHER_YAML = REPO / "conf" / "hydra" / "launcher" / "submitit_slurm.yaml"

BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash not available")

# Fields of hydra_plugins.hydra_submitit_launcher.config.SlurmQueueConf (plugin 1.2.0).
SLURM_QUEUE_CONF_FIELDS = {
    "submitit_folder", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node",
    "mem_gb", "nodes", "name", "stderr_to_stdout", "_target_", "partition", "qos",
    "comment", "constraint", "exclude", "gres", "cpus_per_gpu", "gpus_per_task",
    "mem_per_gpu", "mem_per_cpu", "account", "signal_delay_s", "max_num_timeout",
    "additional_parameters", "array_parallelism", "setup",
}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
@pytest.fixture()
def fake_bin(tmp_path: Path) -> Path:
    """Directory of fake executables that record any call in a marker file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "EXECUTED"
    for name in ("srun", "torchrun", "python", "sbatch"):
        exe = bin_dir / name
        exe.write_text(f'#!/bin/sh\necho "{name} $*" >> "{marker}"\nexit 0\n')
        exe.chmod(0o755)
    return bin_dir


def _run(script: Path, args: list[str], fake_bin: Path, extra_env: dict[str, str] | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess:
    # A minimal environment so SLURM_* etc. of the machine running the tests cannot leak in.
    env = {
        "PATH": f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
    }
    env.update(extra_env or {})
    proc = subprocess.run(
        [BASH, str(script), *args], env=env, cwd=str(cwd or REPO),
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert not (fake_bin.parent / "EXECUTED").exists(), "a --dry-run executed a command"
    return proc


def _command_line(stdout: str, first_word: str) -> list[str]:
    """Tokens of the printed line starting with ``first_word`` (trailing '\\' dropped)."""
    for line in stdout.splitlines():
        stripped = line.strip()
        if stripped.startswith(first_word + " "):
            if stripped.endswith(" \\"):  # line continuation into the torchrun line
                stripped = stripped[:-2]
            return shlex.split(stripped)
    raise AssertionError(f"no line starting with {first_word!r} in:\n{stdout}")


def _opt(tokens: list[str], flag: str) -> str:
    assert tokens.count(flag) == 1, f"{flag} missing or repeated in {tokens}"
    return tokens[tokens.index(flag) + 1]


SLURM_2_NODES = {
    "SLURM_JOB_NODELIST": "node[01-02]",
    "SLURM_NNODES": "2",
    "SLURM_JOB_ID": "123",
    "SLURM_GPUS_ON_NODE": "8",
}


# ---------------------------------------------------------------------------
# (a) + (b) train.sbatch --dry-run
# ---------------------------------------------------------------------------
@needs_bash
def test_sbatch_dry_run_two_nodes(fake_bin: Path) -> None:
    proc = _run(SBATCH, ["--dry-run", "parallel.tp=2", "run.dir=/tmp/x"], fake_bin, SLURM_2_NODES)
    torchrun = _command_line(proc.stdout, "torchrun")
    assert _opt(torchrun, "--nnodes") == "2"
    assert _opt(torchrun, "--nproc-per-node") == "8"
    assert _opt(torchrun, "--rdzv-backend") == "c10d"
    assert _opt(torchrun, "--rdzv-endpoint") == f"node01:{master_port_from_job_id('123')}"
    assert _opt(torchrun, "--rdzv-id") == "123"
    assert _opt(torchrun, "-m") == "megatron_midtrain.train"
    # user overrides verbatim, in order, right after the module; no extra run.dir
    module_at = torchrun.index("-m") + 2
    assert torchrun[module_at:] == ["parallel.tp=2", "run.dir=/tmp/x"]

    srun = _command_line(proc.stdout, "srun")
    assert "--nodes=2" in srun and "--ntasks-per-node=1" in srun
    # srun line and torchrun line together form one command
    assert proc.stdout.rstrip().splitlines()[-1].strip().startswith("torchrun ")


@needs_bash
def test_sbatch_dry_run_without_slurm_uses_single_node_defaults(fake_bin: Path) -> None:
    proc = _run(SBATCH, ["--dry-run", "parallel.tp=2", "run.dir=/tmp/x"], fake_bin)
    torchrun = _command_line(proc.stdout, "torchrun")
    assert _opt(torchrun, "--nnodes") == "1"
    assert _opt(torchrun, "--nproc-per-node") == "8"
    assert _opt(torchrun, "--rdzv-endpoint").startswith("localhost:")
    assert _opt(torchrun, "--rdzv-id") == "dryrun"
    assert torchrun[-2:] == ["parallel.tp=2", "run.dir=/tmp/x"]
    assert "--nodes=1" in _command_line(proc.stdout, "srun")


@needs_bash
def test_sbatch_default_run_dir_is_shared_and_overrides_keep_quoting(fake_bin: Path, tmp_path: Path) -> None:
    odd = ["data.paths=[/d/a,/d/b]", "experiment=it's"]
    proc = _run(SBATCH, ["--dry-run", *odd], fake_bin, {"SLURM_JOB_ID": "77", "SLURM_SUBMIT_DIR": str(tmp_path)})
    torchrun = _command_line(proc.stdout, "torchrun")
    # derived from the job id, not a per-rank timestamp, and absolute
    assert torchrun[-3:] == [*odd, f"run.dir={tmp_path}/runs/77"]


@needs_bash
def test_sbatch_env_knobs_and_container(fake_bin: Path) -> None:
    env = dict(SLURM_2_NODES, GPUS_PER_NODE="4", CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.11-py3",
               SLURM_CPUS_ON_NODE="224")
    proc = _run(SBATCH, ["--dry-run"], fake_bin, env)
    assert _opt(_command_line(proc.stdout, "torchrun"), "--nproc-per-node") == "4"
    srun = _command_line(proc.stdout, "srun")
    assert "--container-image=nvcr.io#nvidia/pytorch:25.11-py3" in srun
    assert "--cpus-per-task=224" in srun


@needs_bash
@pytest.mark.parametrize("nodelist", ["node01", "node[01-02]", "gpu[001-004,007]", "a1,a2",
                                      "rack[1-2]-n[01-02],x9"])
def test_sbatch_and_python_agree_on_rendezvous_host(fake_bin: Path, nodelist: str) -> None:
    # PATH holds only the fake tools (no scontrol), so the script's pure-bash
    # nodelist parser is what produces the rendezvous host here.
    env = {"SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_ID": "4242", "PATH": str(fake_bin)}
    proc = _run(SBATCH, ["--dry-run"], fake_bin, env)
    endpoint = _opt(_command_line(proc.stdout, "torchrun"), "--rdzv-endpoint")
    python_env = torchrun_env_from_slurm({"SLURM_PROCID": "0", "SLURM_JOB_NODELIST": nodelist,
                                          "SLURM_JOB_ID": "4242"})
    assert endpoint == f"{python_env['MASTER_ADDR']}:{python_env['MASTER_PORT']}"


@needs_bash
def test_sbatch_prefers_scontrol_when_available(fake_bin: Path) -> None:
    scontrol = fake_bin / "scontrol"
    scontrol.write_text("#!/bin/sh\necho realhost7\necho realhost8\n")
    scontrol.chmod(0o755)
    proc = _run(SBATCH, ["--dry-run"], fake_bin, SLURM_2_NODES)
    assert _opt(_command_line(proc.stdout, "torchrun"), "--rdzv-endpoint").startswith("realhost7:")


@needs_bash
def test_sbatch_ignores_stale_master_addr(fake_bin: Path) -> None:
    env = dict(SLURM_2_NODES, MASTER_ADDR="localhost", MASTER_PORT="1234")
    proc = _run(SBATCH, ["--dry-run"], fake_bin, env)
    assert _opt(_command_line(proc.stdout, "torchrun"), "--rdzv-endpoint") == "node01:20123"


# ---------------------------------------------------------------------------
# (c) sweep.sh --dry-run
# ---------------------------------------------------------------------------
@needs_bash
def test_sweep_dry_run_prints_multirun_command(fake_bin: Path) -> None:
    proc = _run(SWEEP, ["--dry-run"], fake_bin)
    tokens = _command_line(proc.stdout, "python")
    assert tokens[1:3] == ["-m", "megatron_midtrain.train"]
    assert "-m" in tokens[3:] or "--multirun" in tokens
    assert "hydra/launcher=submitit_slurm" in tokens
    assert "run.dir=${hydra:sweep.dir}/${hydra:sweep.subdir}" in tokens
    assert any(t.startswith("optimizer.lr=") and "," in t for t in tokens)


@needs_bash
def test_sweep_dry_run_passes_user_overrides(fake_bin: Path) -> None:
    proc = _run(SWEEP, ["--dry-run", "optimizer.lr=1e-4,3e-4", "train.max_steps=50"], fake_bin,
                {"NODES": "2", "SWEEP_DIR": "/shared/sw"})
    tokens = _command_line(proc.stdout, "python")
    assert tokens[-2:] == ["optimizer.lr=1e-4,3e-4", "train.max_steps=50"]
    assert "hydra.launcher.nodes=2" in tokens
    assert "hydra.sweep.dir=/shared/sw" in tokens


# ---------------------------------------------------------------------------
# (d) torchrun_env_from_slurm
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node01", "node01"),
        ("node[01-02]", "node01"),
        ("gpu[001-004,007]", "gpu001"),
        ("a1,a2", "a1"),
        ("gpu[007,001-004]", "gpu007"),
        ("rack[1-2]-n[01-02],x9", "rack1-n01"),
    ],
)
def test_torchrun_env_from_slurm_nodelists(nodelist: str, first: str) -> None:
    environ = {
        "SLURM_PROCID": "13",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "5",
        "SLURM_NTASKS_PER_NODE": "8",
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_JOB_ID": "123456",
    }
    before = dict(environ)
    env = torchrun_env_from_slurm(environ)
    assert env == {
        "RANK": "13",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "5",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": first,
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }
    assert environ == before  # input untouched
    assert first_host(nodelist) == first == expand_nodelist(nodelist)[0]


def test_expand_nodelist() -> None:
    assert expand_nodelist("gpu[001-004,007]") == ["gpu001", "gpu002", "gpu003", "gpu004", "gpu007"]
    assert expand_nodelist("a1,a2") == ["a1", "a2"]
    assert expand_nodelist("n[8-11],login") == ["n8", "n9", "n10", "n11", "login"]
    assert expand_nodelist("r[1-2]-g[1-2]") == ["r1-g1", "r1-g2", "r2-g1", "r2-g2"]


def test_torchrun_env_leaves_existing_rank_alone() -> None:
    # Under torchrun inside srun, SLURM_PROCID is the *node* index: must not win.
    environ = {"RANK": "3", "WORLD_SIZE": "16", "SLURM_PROCID": "0", "SLURM_NTASKS": "2",
               "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_JOB_ID": "1"}
    assert torchrun_env_from_slurm(environ) == {}


def test_torchrun_env_outside_slurm_is_empty() -> None:
    assert torchrun_env_from_slurm({"PATH": "/usr/bin"}) == {}


def test_torchrun_env_keeps_master_addr_port_and_derives_local_world_size() -> None:
    environ = {
        "SLURM_PROCID": "9", "SLURM_NTASKS": "12", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
        "SLURM_TASKS_PER_NODE": "4(x2),4", "SLURM_JOB_NODELIST": "n[1-3]",
        "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "31000",
    }
    env = torchrun_env_from_slurm(environ)
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "31000"
    assert env["LOCAL_WORLD_SIZE"] == "4"
    # no job id -> fixed default port; no nodelist -> loopback
    env = torchrun_env_from_slurm({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})
    assert env["MASTER_PORT"] == "29500" and env["MASTER_ADDR"] == "127.0.0.1"


def test_master_port_is_deterministic_and_in_range() -> None:
    assert master_port_from_job_id("123") == 20123
    assert master_port_from_job_id("40000") == 20000
    assert all(20000 <= master_port_from_job_id(str(j)) < 40000 for j in range(0, 100000, 977))
    assert master_port_from_job_id(None) == master_port_from_job_id("dryrun") == 29500


# ---------------------------------------------------------------------------
# (e) conf/hydra/launcher/submitit_slurm.yaml
# ---------------------------------------------------------------------------
def test_submitit_launcher_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = OmegaConf.load(LAUNCHER_YAML)
    assert cfg._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert set(cfg.keys()) <= SLURM_QUEUE_CONF_FIELDS, set(cfg.keys()) - SLURM_QUEUE_CONF_FIELDS
    assert cfg.tasks_per_node == cfg.gpus_per_node == 8  # one task per GPU
    assert all(isinstance(line, str) for line in cfg.setup)

    # Resolve the interpolations the way Hydra would, under hydra.launcher.
    monkeypatch.delenv("SLURM_PARTITION", raising=False)
    monkeypatch.delenv("SLURM_ACCOUNT", raising=False)
    monkeypatch.delenv("SLURM_QOS", raising=False)
    root = OmegaConf.create({"hydra": {"sweep": {"dir": "/sw"}, "job": {"name": "train"}}})
    root.hydra.launcher = cfg
    resolved = OmegaConf.to_container(root.hydra.launcher, resolve=True)
    assert resolved["submitit_folder"] == "/sw/.submitit/%j"
    assert resolved["partition"] is None
    assert resolved["name"] == "train"
    monkeypatch.setenv("SLURM_PARTITION", "h100")
    assert OmegaConf.to_container(root.hydra.launcher, resolve=True)["partition"] == "h100"


def test_submitit_launcher_yaml_matches_installed_plugin() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    fields = {f.name for f in dataclasses.fields(SlurmQueueConf)}
    assert set(OmegaConf.load(LAUNCHER_YAML).keys()) <= fields


def test_slurm_env_module_has_no_heavy_imports() -> None:
    # The helper must be importable before torch/megatron (and on login nodes).
    code = ("import sys, megatron_midtrain.utils.slurm_env; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(REPO), timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"

