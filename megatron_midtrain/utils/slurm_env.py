"""Derive torch.distributed (torchrun-style) environment variables from SLURM.

Two launch modes are supported by this project:

* ``examples/slurm/train.sbatch`` runs **one torchrun per node** under
  ``srun``.  torchrun exports RANK / WORLD_SIZE / LOCAL_RANK / ... to every
  worker itself, so nothing here is needed.  Note that each worker *also*
  inherits the SLURM variables of the enclosing ``srun`` step (e.g.
  ``SLURM_PROCID`` is the *node* index there, not the GPU rank), which is why
  the helper below never overrides an existing ``RANK``.

* Hydra multirun with the submitit launcher
  (``hydra/launcher=submitit_slurm``) starts **one SLURM task per GPU** and
  only sets SLURM variables.  The trainer must translate them before calling
  ``torch.distributed.init_process_group``::

      import os
      from megatron_midtrain.utils.slurm_env import torchrun_env_from_slurm

      os.environ.update(torchrun_env_from_slurm(os.environ))
      torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
      torch.distributed.init_process_group(backend="nccl")  # env:// init

The mapping is::

    RANK             <- SLURM_PROCID
    WORLD_SIZE       <- SLURM_NTASKS
    LOCAL_RANK       <- SLURM_LOCALID
    LOCAL_WORLD_SIZE <- SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE
    MASTER_ADDR      <- first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST
    MASTER_PORT      <- 20000 + SLURM_JOB_ID % 20000

MASTER_ADDR / MASTER_PORT already present in the environment (for example
exported by the launcher's ``setup`` lines) are kept as they are.  The
nodelist is expanded in pure Python, so ``scontrol`` is not required on the
compute node.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional

__all__ = [
    "DEFAULT_MASTER_PORT",
    "expand_nodelist",
    "first_host",
    "master_port_from_job_id",
    "torchrun_env_from_slurm",
]

#: Port used when SLURM_JOB_ID is missing or not numeric.
DEFAULT_MASTER_PORT = 29500
_PORT_BASE = 20000
_PORT_SPAN = 20000

_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


def _split_top_level(text: str) -> List[str]:
    """Split on commas that are not inside ``[...]``."""
    parts: List[str] = []
    depth = 0
    current: List[str] = []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in nodelist {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in nodelist {text!r}")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _expand_range_list(spec: str) -> List[str]:
    """``"001-003,007"`` -> ``["001", "002", "003", "007"]`` (keeps zero padding)."""
    out: List[str] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if "-" in item:
            lo, hi = item.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()):
                raise ValueError(f"bad range {item!r} in nodelist")
            width = len(lo)
            for i in range(int(lo), int(hi) + 1):
                out.append(str(i).zfill(width))
        else:
            out.append(item)
    return out


_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def _expand_group(group: str) -> List[str]:
    match = _BRACKET.search(group)
    if match is None:
        return [group]
    head, tail = group[: match.start()], group[match.end():]
    hosts: List[str] = []
    for value in _expand_range_list(match.group(1)):
        hosts.extend(_expand_group(head + value + tail))
    return hosts


def expand_nodelist(nodelist: str) -> List[str]:
    """Expand a SLURM compact hostlist into host names, in order.

    >>> expand_nodelist("gpu[001-002,007],login1")
    ['gpu001', 'gpu002', 'gpu007', 'login1']
    """
    hosts: List[str] = []
    for group in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_group(group))
    return hosts


def first_host(nodelist: str) -> str:
    """First host of a compact hostlist, without expanding the whole list."""
    groups = _split_top_level(nodelist.strip())
    if not groups:
        raise ValueError("empty nodelist")

    def first_of(match: "re.Match[str]") -> str:
        item = match.group(1).split(",")[0].strip()
        return item.split("-", 1)[0]

    return _BRACKET.sub(first_of, groups[0])


def master_port_from_job_id(job_id: Optional[str]) -> int:
    """Deterministic rendezvous port in [20000, 40000) shared by all tasks of a job."""
    if job_id is None or not str(job_id).strip().isdigit():
        return DEFAULT_MASTER_PORT
    return _PORT_BASE + int(str(job_id).strip()) % _PORT_SPAN


def _tasks_on_node(environ: Mapping[str, str], world_size: int) -> int:
    per_node = environ.get("SLURM_NTASKS_PER_NODE", "").strip()
    if per_node.isdigit():
        return int(per_node)
    # SLURM_TASKS_PER_NODE looks like "8(x2)" or "8(x2),4".
    layout = environ.get("SLURM_TASKS_PER_NODE", "").strip()
    if layout:
        counts: List[int] = []
        for item in layout.split(","):
            m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
            if m is None:
                counts = []
                break
            counts.extend([int(m.group(1))] * int(m.group(2) or 1))
        node_id = environ.get("SLURM_NODEID", "0").strip()
        if counts and node_id.isdigit() and int(node_id) < len(counts):
            return counts[int(node_id)]
    nnodes = environ.get("SLURM_NNODES", environ.get("SLURM_JOB_NUM_NODES", "")).strip()
    if nnodes.isdigit() and int(nnodes) > 0:
        return max(1, world_size // int(nnodes))
    return world_size


def torchrun_env_from_slurm(environ: Mapping[str, str]) -> Dict[str, str]:
    """Return the torchrun variables implied by a SLURM task environment.

    Returns an empty dict (nothing to change) when ``RANK`` is already set
    (torchrun, or a previous call) or when ``SLURM_PROCID`` is absent (not a
    SLURM task).  Otherwise returns RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT as strings, suitable for
    ``os.environ.update``.  ``environ`` itself is never modified.
    """
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}

    rank = int(environ["SLURM_PROCID"])
    world_size = int(environ.get("SLURM_NTASKS", "1"))
    local_rank = int(environ.get("SLURM_LOCALID", "0"))
    local_world_size = _tasks_on_node(environ, world_size)

    master_addr = environ.get("MASTER_ADDR")
    if not master_addr:
        nodelist = next((environ[v] for v in _NODELIST_VARS if environ.get(v)), "")
        master_addr = first_host(nodelist) if nodelist else "127.0.0.1"
    master_port = environ.get("MASTER_PORT") or str(
        master_port_from_job_id(environ.get("SLURM_JOB_ID"))
    )

    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }
