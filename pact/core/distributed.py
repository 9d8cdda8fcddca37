"""torch.distributed helpers for runs launched by torchrun (or SLURM via torchrun).

`process_group(device)` initialises the default process group from torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) when
WORLD_SIZE > 1 -- gloo on CPU, nccl on CUDA -- and destroys it on exit; a group the
caller initialised is reused and left alone. Everything else here is a no-op (or the
identity) in a single process, so the trainer has one code path:

- `Ranks`: this process's rank, the world size, its local rank on the node;
- `barrier`, `all_reduce`, `all_gather_objects`;
- `agree(error)`: every rank raises when one of them failed (instead of the others
  waiting forever in the next collective);
- `on_main(fn)`: rank-0-only I/O (checkpoints, metrics, outputs) while the others wait;
  an error on rank 0 is raised on every rank;
- `wrap_model`: DDP (`find_unused_parameters=False`) or FSDP (`fully_shard` per
  decoder layer, then the root);
- `FullState`: full (unsharded) weights and optimizer state of an FSDP model for
  checkpoints that load on any world size.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import traceback
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from pact.core.errors import PactError

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
TIMEOUT = timedelta(minutes=30)
T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process in a multi-process launch: global `rank` of `world_size`, `local_rank`
    on its node. `Ranks()` is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process: collectives run."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes."""
        return self.rank == 0


def _env_int(environ: Mapping[str, str], key: str, default: int | None) -> int:
    text = environ.get(key)
    if text is None:
        if default is None:
            raise PactError(f"WORLD_SIZE is set but {key} is not: launch with torchrun")
        return default
    if not text.strip().isdigit():
        raise PactError(f"environment variable {key}={text!r} is not a non-negative integer")
    return int(text)


def launch_ranks(environ: Mapping[str, str] | None = None) -> Ranks:
    """Ranks from torchrun's environment; `Ranks()` when WORLD_SIZE is absent."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return Ranks()
    world = _env_int(environ, "WORLD_SIZE", None)
    rank = _env_int(environ, "RANK", None)
    local = _env_int(environ, "LOCAL_RANK", 0)
    if world < 1 or rank >= world:
        raise PactError(f"RANK={rank} WORLD_SIZE={world}: need WORLD_SIZE >= 1 and RANK < WORLD_SIZE")
    return Ranks(rank, world, local)


def current_ranks() -> Ranks:
    """Ranks of the initialised default process group, or `Ranks()`."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    local = _env_int(os.environ, "LOCAL_RANK", 0)
    return Ranks(dist.get_rank(), dist.get_world_size(), local)


def _wants_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def backend_for(device: str) -> str:
    """nccl for CUDA devices ('auto' with CUDA available included), gloo otherwise."""
    return "nccl" if _wants_cuda(device) else "gloo"


def rank_device(device: str, ranks: Ranks) -> str:
    """'auto' or 'cuda' becomes cuda:LOCAL_RANK in a multi-process launch with CUDA;
    anything else (cpu, cuda:N) is kept."""
    if ranks.enabled and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ranks.local_rank}"
    return device


def rank_device_problem(device: str, ranks: Ranks, cuda_devices: int) -> str | None:
    """Why `device` cannot serve this rank of a multi-process launch on a node with
    `cuda_devices` GPUs (each rank takes cuda:LOCAL_RANK, the only index accepted), or
    None when it can."""
    if not ranks.enabled:
        return None
    where = f"rank {ranks.rank} of {ranks.world_size}"
    if device.startswith("cuda:") and device != f"cuda:{ranks.local_rank}":
        return (
            f"--device {device} under torchrun ({where}, LOCAL_RANK={ranks.local_rank}): the ranks "
            "would share that one GPU; pass --device cuda (each rank takes cuda:LOCAL_RANK)"
        )
    if device.startswith("cuda:"):
        device = "cuda"
    if device == "cuda" and cuda_devices == 0:
        return f"--device cuda under torchrun ({where}), but this node has no CUDA device: use --device cpu (gloo)"
    if device in ("cuda", "auto") and 0 < cuda_devices <= ranks.local_rank:
        return (
            f"{where} has LOCAL_RANK={ranks.local_rank}, but this node has {cuda_devices} CUDA device(s): "
            f"start at most {cuda_devices} processes per node (--nproc_per_node {cuda_devices})"
        )
    return None


@contextlib.contextmanager
def process_group(device: str, environ: Mapping[str, str] | None = None) -> Iterator[Ranks]:
    """The default process group for a torchrun launch (WORLD_SIZE > 1), destroyed on exit.

    gloo when `device` is the CPU, nccl (with the CUDA device set to LOCAL_RANK) when it
    is CUDA; PactError when the device cannot serve this rank (`rank_device_problem`),
    before any group exists. A group initialised by the caller is reused and not
    destroyed. A single process gets `Ranks()` and no group. On exit the group is
    destroyed, and gloo's worker threads end with it (see the import of
    torch.distributed.nn below) unless torch itself still holds the group, as it does
    after FSDP (docs/distributed.md, "Known issue").
    """
    if dist.is_available() and dist.is_initialized():
        yield current_ranks()
        return
    ranks = launch_ranks(environ)
    if not ranks.enabled:
        yield ranks
        return
    if not dist.is_available():
        raise PactError("this torch build has no torch.distributed: cannot run under torchrun")
    problem = rank_device_problem(device, ranks, torch.cuda.device_count())
    if problem is not None:
        raise PactError(problem)
    # torch.distributed.nn's functions take the default group as a default argument
    # (`def broadcast(..., group=group.WORLD)`). Imported after init_process_group --
    # loading a model with transformers and importing FSDP both import it -- it would hold
    # the group past destroy_process_group, so gloo's worker threads would live on into
    # interpreter shutdown, where one releasing a collective's tensors needs the GIL and
    # aborts the process ("terminate called without an active exception"). Imported
    # first, it binds None.
    importlib.import_module("torch.distributed.nn")
    backend = backend_for(device)
    options: dict[str, Any] = {"backend": backend, "timeout": TIMEOUT}
    if backend == "nccl":
        torch.cuda.set_device(ranks.local_rank)
        options["device_id"] = torch.device("cuda", ranks.local_rank)
    try:
        dist.init_process_group(**options)
    except (RuntimeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise PactError(f"cannot initialise the {backend} process group (rank {ranks.rank} of {ranks.world_size}): {reason}") from None
    try:
        yield current_ranks()
    except BaseException as exc:
        # The failed block's frames still hold its objects, a DDP model among them;
        # clearing their locals lets them go before the group does (see `_release`).
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        _release()


def _release() -> None:
    """Destroy the default group so that gloo's worker threads end with it.

    Whatever still holds the group (a DDP model's reducer, FSDP's device mesh) must
    let go of it first, so cyclic garbage is collected and the meshes of
    `wrap_model` drop the group here. Freed after the group, such a holder would drop
    the last reference itself, joining gloo's threads while holding the GIL, and a
    thread still releasing the tensors of the last collective waits for that GIL:
    both wait forever (seen with DDP under load, docs/distributed.md).
    """
    for ref in _MESHES:
        registry = getattr(ref(), "_pg_registry", None)  # DeviceMesh: group name -> group
        if isinstance(registry, dict):
            registry.clear()
    _MESHES.clear()
    gc.collect()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- collectives


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if current_ranks().enabled:
        dist.barrier()


def all_reduce(values: Sequence[float] | Tensor, op: str = "sum") -> list[float]:
    """Element-wise sum or max of `values` over the ranks, in float64 (the values
    themselves in a single process)."""
    if op not in ("sum", "max"):
        raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
    if isinstance(values, Tensor):
        values = values.detach().double().cpu().tolist()
    if not current_ranks().enabled:
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.cpu().tolist()


def all_gather_objects(value: T) -> list[T]:
    """[value of rank 0, value of rank 1, ...] on every rank (picklable values)."""
    ranks = current_ranks()
    if not ranks.enabled:
        return [value]
    gathered: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def agree(error: PactError | None) -> None:
    """Raise on every rank when any rank passes an error: the first failing rank's
    message (prefixed with its rank in a multi-process run). Every rank must call it."""
    messages = all_gather_objects(None if error is None else str(error))
    for rank, message in enumerate(messages):
        if message is not None:
            if error is not None and len(messages) == 1:
                raise error
            raise PactError(f"rank {rank}: {message}" if len(messages) > 1 else message)


@contextlib.contextmanager
def agreeing() -> Iterator[None]:
    """Run a block on every rank; a PactError on any rank is raised on all of them
    (`agree`). Other exceptions propagate on their own rank."""
    try:
        yield
    except PactError as exc:
        agree(exc)
        raise
    agree(None)


def on_main(fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 only (file writes) while the others wait; its PactError or
    OSError is raised on every rank. Returns fn's result on rank 0, None elsewhere."""
    ranks = current_ranks()
    if not ranks.enabled:
        return fn()
    result: T | None = None
    error: PactError | None = None
    if ranks.is_main:
        try:
            result = fn()
        except OSError as exc:
            error = PactError(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
        except PactError as exc:
            error = exc
    agree(error)
    return result


# ----------------------------------------------------------------------------- models


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a transformers model (its `_no_split_modules` classes)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def wrap_model(model: torch.nn.Module, ranks: Ranks, device: str, *, fsdp: bool) -> torch.nn.Module:
    """The module the training loop calls: the model itself in a single process, DDP
    (`find_unused_parameters=False`) or, with `fsdp`, the model sharded in place with
    `fully_shard` (each decoder layer, then the root)."""
    if not ranks.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        layers = decoder_layers(model)
        if not layers:
            raise PactError(
                f"--fsdp: cannot find the decoder layers of {type(model).__name__} (no _no_split_modules)"
            )
        mesh = _fsdp_mesh(device, ranks)
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.device(device).index or 0] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


# The device meshes `wrap_model` shards over. A mesh keeps the process group in a
# registry of its own, and DTensor's caches keep the mesh alive after the model is
# gone, so `_release` empties those registries before it destroys the group.
_MESHES: list[weakref.ref] = []


def _fsdp_mesh(device: str, ranks: Ranks) -> Any:
    """The 1-D mesh of all ranks (what `fully_shard` makes by default), remembered for
    `_release`."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(torch.device(device).type, (ranks.world_size,))
    _MESHES[:] = [ref for ref in _MESHES if ref() is not None] + [weakref.ref(mesh)]
    return mesh


def gradient_sync(wrapped: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-batch's forward and backward: with `sync` False the
    gradients only accumulate locally (DDP `no_sync`, FSDP
    `set_requires_gradient_sync(False)`); the last micro-batch of a step syncs."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapped, DistributedDataParallel):
        return contextlib.nullcontext() if sync else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):
        wrapped.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


class FullState:
    """Full (unsharded) trainable weights and optimizer state of an FSDP model, in the
    layout of a single-process run: weights by parameter name, the optimizer state dict
    keyed by the index of each trainable parameter (`optimizer.state_dict()`), so a
    checkpoint loads on any world size, with or without FSDP. Every method is a
    collective: call it on every rank."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]

    @staticmethod
    def _options(**extra: bool) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True, **extra)

    def weights(self) -> dict[str, Tensor]:
        """Trainable weights by name on rank 0 (float tensors on the CPU); {} elsewhere."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(self.model, options=self._options())
        trainable = set(self.names)
        return {n: t.contiguous() for n, t in full.items() if n in trainable}

    def model_state(self) -> dict[str, Tensor]:
        """The whole state dict (every weight and persistent buffer) on rank 0; {} elsewhere."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model, options=self._options())

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer state dict keyed by trainable-parameter index, on rank 0."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        named = get_optimizer_state_dict(self.model, self.optimizer, options=self._options())
        if not named:
            return {}
        index = {name: i for i, name in enumerate(self.names)}
        groups = [dict(g, params=[index[n] for n in g["params"]]) for g in named["param_groups"]]
        return {"state": {index[n]: s for n, s in named["state"].items()}, "param_groups": groups}

    def load_weights(self, weights: dict[str, Tensor]) -> None:
        """Shard full trainable weights (the same dict on every rank) into the model."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, weights, options=self._options(strict=False))

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        """Shard an index-keyed optimizer state dict (the same on every rank) into the optimizer."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        groups = [dict(g, params=[self.names[i] for i in g["params"]]) for g in state["param_groups"]]
        named = {"state": {self.names[int(i)]: s for i, s in state["state"].items()}, "param_groups": groups}
        set_optimizer_state_dict(self.model, self.optimizer, named, options=self._options())
