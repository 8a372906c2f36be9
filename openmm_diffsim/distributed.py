"""Training across processes and machines with :mod:`torch.distributed`.

A :class:`~openmm_diffsim.training.Trainer` whose process belongs to an
initialised process group of more than one process splits its state points
between the processes (*ranks*): each rank samples and estimates gradients
for its own states only, the gradients are summed over ranks
(all-reduce), and every rank takes the same optimiser step, so the
parameters stay equal everywhere. Only rank 0 writes logs, checkpoints,
plots and exports and prints progress.

Launch with ``torchrun`` (one process per GPU or per group of CPU cores)::

    torchrun --nproc-per-node 4 -m openmm_diffsim.cli fit run.toml
    torchrun --nproc-per-node 4 --no-python openmm-diffsim fit run.toml

and from Python call :func:`init` before :meth:`Trainer.fit
<openmm_diffsim.training.Trainer.fit>`. Without torchrun's environment (or
with ``WORLD_SIZE=1``) :func:`init` does nothing and training runs in one
process, as always.

Design choices (see ``docs/distributed.md``):

* **Backend**: ``gloo`` by default, also when OpenMM samples on GPUs. Per
  epoch the ranks exchange one gradient vector (the potential's parameters:
  a few hundred to a few ten thousand numbers) and a few small Python
  objects (losses, RDFs for the log); that costs well under a millisecond
  over gloo, while NCCL would need a CUDA context in torch next to OpenMM's.
  ``backend="nccl"`` (or ``OPENMM_DIFFSIM_BACKEND=nccl``) works too.
* **States are the unit of work**: a state's sampler, snapshots and
  estimator live on one rank for the whole run. The split depends only on
  the states (largest first onto the least loaded rank, see
  :func:`partition`), and every random stream is seeded per state, never
  per rank, so one process and K processes compute the same parameters (to
  floating-point round-off of the gradient sum).
* **More ranks than states**: the extra ranks hold no state and only take
  part in the collective steps; training does not get faster past one rank
  per state (replicas are not split).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any, List, Optional, Sequence

import torch

__all__ = [
    "init",
    "shutdown",
    "is_distributed",
    "rank",
    "world_size",
    "is_main_process",
    "launched_by_torchrun",
    "partition",
    "state_cost",
    "all_reduce_gradients",
    "all_reduce",
    "all_gather_objects",
    "broadcast_object",
    "broadcast_parameters",
    "barrier",
]

logger = logging.getLogger("openmm_diffsim.distributed")

BACKENDS = ("gloo", "nccl")
#: Environment variable that picks the backend when :func:`init` is not told one.
BACKEND_ENV = "OPENMM_DIFFSIM_BACKEND"

_created_here = False  # whether shutdown() should destroy the default group


def _int_env(name: str, default: Optional[int] = None) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def launched_by_torchrun() -> bool:
    """True when the environment describes more than one process (``WORLD_SIZE > 1``)."""
    return (_int_env("WORLD_SIZE", 1) or 1) > 1


def is_distributed() -> bool:
    """True when the default process group is initialised with more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_main_process() -> bool:
    """True on rank 0 and in a single process: the process that writes files and prints."""
    return rank() == 0


def init(
    backend: Optional[str] = None,
    timeout_minutes: float = 30.0,
    configure_devices: bool = True,
) -> bool:
    """Join the process group that ``torchrun`` describes in the environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` (set by ``torchrun``; set them
    yourself for another launcher). Does nothing when ``WORLD_SIZE`` is unset
    or 1, or when a process group already exists (then that group is used).

    Parameters
    ----------
    backend : {"gloo", "nccl"}, optional
        Collective backend; default ``$OPENMM_DIFFSIM_BACKEND`` or ``gloo``
        (gradients are small: see the module notes).
    timeout_minutes : float
        How long a collective waits for the slowest rank before failing
        (covers e.g. rank 0 simulating reference targets alone).
    configure_devices : bool
        Share the node between its ranks: OpenMM's CPU platform gets
        ``cores / LOCAL_WORLD_SIZE`` threads (unless ``OPENMM_CPU_THREADS``
        is set), its CUDA platform device ``LOCAL_RANK mod #GPUs``, and torch
        as many intra-op threads as OpenMM (unless ``OMP_NUM_THREADS`` is
        set; ``torchrun`` sets it to 1). Explicit ``platform_properties`` of
        the sampler still win.

    Returns
    -------
    bool
        True if this process now belongs to a group of more than one process.

    Raises
    ------
    ValueError
        Inconsistent or incomplete environment, or an unknown backend.
    """
    import torch.distributed as dist

    if not dist.is_available():
        if launched_by_torchrun():
            raise RuntimeError("torch.distributed is not available in this PyTorch build")
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    size = _int_env("WORLD_SIZE", 1) or 1
    if size <= 1:
        return False
    this_rank = _int_env("RANK")
    if this_rank is None:
        raise ValueError("WORLD_SIZE > 1 but RANK is not set: launch with torchrun (or set RANK for each process)")
    if not 0 <= this_rank < size:
        raise ValueError(f"RANK={this_rank} is outside 0..WORLD_SIZE-1={size - 1}")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ValueError(f"WORLD_SIZE > 1 but {' and '.join(missing)} not set: launch with torchrun")
    local_rank = _int_env("LOCAL_RANK", 0) or 0
    local_size = _int_env("LOCAL_WORLD_SIZE", None) or size
    backend = (backend or os.environ.get(BACKEND_ENV) or "gloo").lower()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA; use 'gloo' on CPU-only machines")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not timeout_minutes > 0:
        raise ValueError(f"timeout_minutes must be positive, got {timeout_minutes}")
    dist.init_process_group(
        backend, init_method="env://", rank=this_rank, world_size=size, timeout=timedelta(minutes=timeout_minutes)
    )
    global _created_here
    _created_here = True
    if configure_devices:
        _share_node(local_rank, max(1, local_size))
    logger.info("rank %d of %d (local rank %d) joined the %s process group", this_rank, size, local_rank, backend)
    return True


def shutdown() -> None:
    """Leave the process group if :func:`init` created it (safe to call always)."""
    import torch.distributed as dist

    global _created_here
    if _created_here and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _created_here = False


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _share_node(local_rank: int, local_size: int) -> None:
    """Split the node's cores and GPUs between its ranks (OpenMM platform defaults, torch threads)."""
    threads = max(1, _available_cores() // local_size)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)
    try:
        import openmm
    except ImportError:  # training will say so with an install hint
        return
    names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    if "CPU" in names and "OPENMM_CPU_THREADS" not in os.environ:
        openmm.Platform.getPlatformByName("CPU").setPropertyDefaultValue("Threads", str(threads))
    if "CUDA" in names and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        device = local_rank % torch.cuda.device_count()
        openmm.Platform.getPlatformByName("CUDA").setPropertyDefaultValue("DeviceIndex", str(device))


# -- splitting the work ------------------------------------------------------------------------------


def state_cost(state: Any) -> float:
    """Relative cost of one state's epoch: its number of particles.

    Every state runs the same number of MD steps and rollout steps per
    epoch, and a step of a pair potential with a fixed cutoff costs O(N).
    """
    return float(getattr(state, "n_particles", 1))


def partition(costs: Sequence[float], n_ranks: int) -> List[List[int]]:
    """Split items (state points) between ranks, balancing the summed cost.

    Greedy longest-processing-time: items in decreasing cost (ties: lower
    index first) each go to the rank with the least cost so far (ties:
    lower rank). Equal costs give round robin: item i on rank i mod K.
    Depends only on ``costs`` and ``n_ranks``, so every rank computes the
    same split.

    Parameters
    ----------
    costs : sequence of float, length S
        Non-negative cost per item.
    n_ranks : int
        Number of ranks K (>= 1).

    Returns
    -------
    list of list of int, length K
        Item indices per rank, ascending; ranks past S get none.
    """
    n_ranks = int(n_ranks)
    if n_ranks < 1:
        raise ValueError(f"n_ranks must be at least 1, got {n_ranks}")
    costs = [float(c) for c in costs]
    for c in costs:
        if not c >= 0:
            raise ValueError(f"costs must be non-negative numbers, got {c}")
    load = [0.0] * n_ranks
    count = [0] * n_ranks
    parts: List[List[int]] = [[] for _ in range(n_ranks)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        # Least loaded, then fewest items (zero-cost items still spread), then lowest rank.
        target = min(range(n_ranks), key=lambda k: (load[k], count[k], k))
        parts[target].append(index)
        load[target] += costs[index]
        count[target] += 1
    return [sorted(p) for p in parts]


# -- collectives ----------------------------------------------------------------------------------------


def _device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A reduced copy of ``tensor`` over all ranks (``op``: ``sum``, ``min`` or ``max``).

    Returns the tensor unchanged when not distributed.
    """
    if not is_distributed():
        return tensor
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
    buffer = tensor.detach().to(_device(), copy=True)
    dist.all_reduce(buffer, op=ops[op])
    return buffer.to(tensor.device)


def all_reduce_gradients(parameters: Sequence[torch.Tensor]) -> None:
    """Sum ``p.grad`` over ranks, in place, in one collective.

    A parameter keeps ``grad=None`` only if it has no gradient on every rank
    (optimisers skip such parameters, exactly as in one process); a rank
    without a gradient for it contributes zeros otherwise. The sum is taken
    in float64.
    """
    if not is_distributed():
        return
    parameters = list(parameters)
    if not parameters:
        return
    pieces = []
    for p in parameters:
        g = p.grad
        pieces.append(torch.zeros(p.numel(), dtype=torch.float64) if g is None else g.detach().reshape(-1).double())
    present = torch.tensor([0.0 if p.grad is None else 1.0 for p in parameters], dtype=torch.float64)
    total = all_reduce(torch.cat(pieces + [present]))
    offset = 0
    flags = total[-len(parameters) :]
    for k, p in enumerate(parameters):
        n = p.numel()
        if flags[k] > 0:
            p.grad = total[offset : offset + n].reshape(p.shape).to(dtype=p.dtype, device=p.device)
        else:
            p.grad = None
        offset += n


def broadcast_parameters(parameters: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``parameters`` (in place) with rank ``src``'s values."""
    if not is_distributed():
        return
    import torch.distributed as dist

    parameters = list(parameters)
    if not parameters:
        return
    flat = torch.cat([p.detach().reshape(-1).double() for p in parameters]).to(_device())
    dist.broadcast(flat, src=src)
    flat = flat.cpu()
    offset = 0
    with torch.no_grad():
        for p in parameters:
            n = p.numel()
            p.copy_(flat[offset : offset + n].reshape(p.shape).to(p.dtype))
            offset += n


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when not distributed."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here (no-op when not distributed)."""
    if not is_distributed():
        return
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()
