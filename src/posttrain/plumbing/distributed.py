"""The processes of a run: one, or several under ``accelerate launch`` / ``torchrun`` (data parallel).

Data parallelism is accelerate's (DDP, or FSDP2 when the launch config asks for it); this module only states the
semantics posttrain promises on top of it (docs/scaling.md), each tested with 2 CPU processes (gloo):

* ``batch_size`` is the **global** batch of an optimizer step (``batch_size * grad_accum`` units); each rank takes
  a contiguous ``1/world`` share of the same global draw (:meth:`Processes.shard`), so N processes see exactly
  the units one process would, and the same seed gives the same data order whatever the world size.
* Token-mean losses divide by the global token count of the step, summed over ranks (:meth:`Processes.sum`) and
  micro-batches; DDP and FSDP *average* gradients over ranks, so a rank's loss is multiplied by the world size
  before backward (:meth:`Processes.backward`), which makes the reduced gradient the one-process gradient.
* Only rank 0 writes (logs, plots, checkpoints, the final model); every rank keeps its own RNG streams, saved in
  the checkpoint per rank, so an N-process run resumes bit-exactly as N processes.

Single-process runs (``WORLD_SIZE`` unset or 1) never import accelerate: every method is the identity.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Callable

import torch


def launched_world_size() -> int:
    """The number of processes this one was launched with (``WORLD_SIZE`` from accelerate launch / torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def local_device(name: str = "auto") -> torch.device:
    """``auto`` = cuda when available, else cpu; under a multi-process launch a bare ``cuda`` is this process's own
    GPU (``cuda:LOCAL_RANK``), as accelerate places it."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and launched_world_size() > 1:
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}"
    return torch.device(name)


class CallThrough(torch.nn.Module):
    """``wrapper(fn, *args)`` runs ``fn(model, *args)`` inside ``forward``, so DDP's and FSDP's forward hooks see
    every training forward, whatever part of the model a stage's loss calls (backbone + head on selected positions,
    a reward head, the value head)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self._no_split_modules = getattr(model, "_no_split_modules", None)  # FSDP auto-wrap reads it

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


class Processes:
    """Rank, world size and the few collective operations the stages use (see the module docstring)."""

    def __init__(self, device: torch.device):
        device = torch.device(device)
        self.world = launched_world_size()
        self.accelerator = None
        self.device = device
        self.rank = 0
        self.backend, self.kind = None, "single"
        self._model_of: dict[int, torch.nn.Module] = {}  # optimizer id -> its model (FSDP optimizer state)
        if self.world > 1:
            from datetime import timedelta

            from accelerate import Accelerator
            from accelerate.utils import InitProcessGroupKwargs

            # rank 0 alone writes checkpoints (checksummed) and DPO's cached reference while the others wait in a
            # barrier: minutes on a large model, past the default collective timeout of 10 minutes
            timeout = timedelta(seconds=float(os.environ.get("POSTTRAIN_COLLECTIVE_TIMEOUT_S", 3 * 3600)))
            self.accelerator = Accelerator(cpu=device.type == "cpu",
                                           kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
            self.rank = self.accelerator.process_index
            self.device = self.accelerator.device
            self.backend = str(self.accelerator.state.backend)
            self.kind = "fsdp" if self.accelerator.is_fsdp2 or self._fsdp1() else "ddp"

    def _fsdp1(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self, global_batch: int, grad_accum: int) -> dict[str, Any]:
        """How the run ran (``config.yaml``'s ``launch`` section): world size, the global batch of an optimizer step
        and each process's share, backend, parallelism."""
        return {"num_processes": self.world, "global_batch_size": global_batch,
                "per_device_batch_size": global_batch // self.world, "grad_accum": grad_accum,
                "backend": self.backend, "parallelism": self.kind, "device": str(self.device)}

    def check_divisible(self, units: int, what: str) -> None:
        from posttrain.plumbing.config import ConfigError

        if units % self.world:
            raise ConfigError(f"{what} = {units} is the global batch of a step and must divide evenly among "
                              f"{self.world} processes")

    # -- data ---------------------------------------------------------------------------------------------------
    def shard(self, items: list) -> list:
        """This rank's contiguous ``1/world`` share of a global batch (its length divides by the world size)."""
        per = len(items) // self.world
        return items[self.rank * per : (self.rank + 1) * per] if self.world > 1 else items

    # -- collectives --------------------------------------------------------------------------------------------
    def sum(self, *values: float) -> tuple[float, ...] | float:
        """Sums over ranks of the given scalars (float64, one all-reduce); one value in, one value out."""
        if self.world > 1:
            tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(tensor)
            values = tuple(tensor.tolist())
        return values[0] if len(values) == 1 else tuple(values)

    def max(self, value: float) -> float:
        if self.world > 1:
            tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
            value = float(tensor)
        return value

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (pickled; small things only)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    # -- models -------------------------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, optimizer, *, unused_parameters: bool = False):
        """(forward, optimizer): ``forward(fn, *args)`` runs ``fn(model, *args)`` through accelerate's DDP / FSDP
        wrapper (one process: directly). Under FSDP the optimizer's parameters are the sharded ones.
        ``unused_parameters``: some parameters get no gradient in a step (DDP must then look for them)."""
        if self.world == 1:
            return (lambda fn, *args, **kwargs: fn(model, *args, **kwargs)), optimizer
        from accelerate.utils import DistributedDataParallelKwargs

        # broadcast_buffers off: the buffers (rotary tables) are constants, and broadcasting them is a collective
        # in every forward, which would tie ranks that run different numbers of forwards (RL) in a deadlock
        self.accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=unused_parameters,
                                                                     broadcast_buffers=False)
        with warnings.catch_warnings():  # torch's rename of broadcast_buffers, which accelerate still passes
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*is deprecated", category=FutureWarning)
            wrapped, prepared = self.accelerator.prepare(CallThrough(model), optimizer)
        self._model_of[id(getattr(prepared, "optimizer", prepared))] = model
        return wrapped, prepared

    def accumulating(self, forward, last: bool):
        """Gradients of this micro-batch stay local unless it is the step's ``last`` (DDP/FSDP ``no_sync``)."""
        if self.world == 1 or last:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(forward)

    @contextlib.contextmanager
    def gathered(self, forward):
        """The model usable directly (generation, evaluation) for the duration: under FSDP the root's parameters
        (embeddings, final norm, LM head) are gathered, and each wrapped layer gathers its own as it runs."""
        if self.kind != "fsdp":
            yield
            return
        forward.unshard()
        try:
            yield
        finally:
            forward.reshard()

    def backward(self, loss: torch.Tensor) -> None:
        """``loss`` holds this rank's share of a global mean (its sum over the global count); DDP and FSDP average
        gradients over ranks, so it is scaled by the world size first and the reduced gradient is the global one."""
        (loss * self.world if self.world > 1 else loss).backward()

    # -- state for checkpoints (collective under FSDP: every rank calls them) -----------------------------------
    def _options(self, **kwargs):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)

    def full_state_dict(self, module) -> dict[str, torch.Tensor] | None:
        """The full (unsharded, CPU) state dict of an FSDP-sharded module on rank 0; None where the module's own
        ``state_dict`` is already whole (one process, DDP)."""
        if self.kind != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(module, options=self._options())

    def full_optimizer_state(self, optimizer) -> dict[str, Any]:
        if self.kind != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        return get_optimizer_state_dict(self._model_of[id(inner)], inner, options=self._options())

    def load_module_state(self, module, weights: dict[str, torch.Tensor]):
        """Load full ``weights`` into ``module`` (scattered into its shards under FSDP); (missing, unexpected)."""
        if self.kind != "fsdp":
            return module.load_state_dict(weights, strict=False)
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        return set_model_state_dict(module, weights, options=self._options(strict=False))

    def load_optimizer_state(self, optimizer, state: dict[str, Any]) -> None:
        if self.kind != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        inner = getattr(optimizer, "optimizer", optimizer)
        set_optimizer_state_dict(self._model_of[id(inner)], inner, state, options=self._options())

    def unwrap(self, model):
        return model.model if isinstance(model, CallThrough) else model


_PROCESSES: dict[str, Processes] = {}


def processes(device: str | torch.device = "auto") -> Processes:
    """The run's :class:`Processes` (one per interpreter under a launch: accelerate's state is global)."""
    device = local_device(device) if isinstance(device, str) else device
    key = "world" if launched_world_size() > 1 else str(device)
    if key not in _PROCESSES:
        _PROCESSES[key] = Processes(device)
    return _PROCESSES[key]
