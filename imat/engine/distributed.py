"""Data-parallel training for the engine: ``torchrun`` on one machine, Ray Train across machines.

What the engine does when ``world_size() > 1``:

* every rank trains on its own device: :func:`process_device` binds ``device: auto|cuda`` to
  ``cuda:LOCAL_RANK`` under torchrun and to ``ray.train.torch.get_device()`` in a Ray Train worker (Ray
  shares ``CUDA_VISIBLE_DEVICES`` among a node's workers, so a bare ``cuda`` would put them all on GPU 0);
* a task with one backward per step (teachers, CE, KD, MEAL in ``grl``/``joint`` mode, MEAL without
  discriminators) runs its ``step`` inside ``torch.nn.parallel.DistributedDataParallel`` over all of its
  trained modules (:class:`TaskStep`), so gradients are averaged in buckets while backward still runs
  (communication overlaps computation). A task with ``manual_optimization`` (MEAL's alternating
  discriminator and student steps: two backward passes and two optimisers per step, which DDP's
  one-forward/one-backward hook cannot express) keeps the manual path: each optimiser step first averages
  exactly the gradients it is about to apply (:func:`average_gradients`, one coalesced ``all_reduce``
  per dtype). Both compute DDP's mean gradient; the 2-process gloo test checks the one-process contract;
* parameters and buffers of every task module are broadcast from rank 0 when ``fit`` starts (and after
  a resume), so all ranks start identical; BatchNorm running statistics are averaged across ranks at
  every epoch end (timm's ``distribute_bn``), or synchronised every step with ``train.sync_bn``
  (timm's ``convert_sync_batchnorm``, which keeps fused norm+activation layers whole; CUDA only);
* the training loader is re-built over a :class:`ShardedSampler` (rank r takes every world-th index of
  the sampler's order, padded to equal length so every rank runs the same number of steps), with a
  generator of its own for the workers' seeds: the order is the same on every rank, the augmentation
  streams are not (:mod:`imat.engine.loop`); the
  validation loader is sharded without padding; ``batch_size`` is per process;
* epoch sums (losses, images, skipped) and validation counts (hits, loss, n) are summed across ranks,
  so ``summary.csv`` has the same columns and meaning as one process;
* only rank 0 writes (``summary.csv``, ``last.ckpt``, ``best.safetensors``, TensorBoard), followed by a
  barrier so no rank races ahead of a checkpoint;
* under Ray Train every epoch is reported to Ray (``ray.train.report`` with a ``Checkpoint`` holding
  ``last.ckpt``), so a run that loses a worker is restarted by Ray (``FailureConfig``) from that
  checkpoint (:mod:`imat.engine.ray_train`).

Frozen teachers take no part: they have no optimiser, so nothing of theirs is reduced.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from imat.errors import ImatError

log = logging.getLogger("imat.engine")


# --- process group -------------------------------------------------------------------------------------


def _dist() -> Any:
    return torch.distributed


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    d = _dist()
    return bool(d.is_available() and d.is_initialized() and d.get_world_size() > 1)


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def rank() -> int:
    d = _dist()
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


# Set in the worker processes that :func:`run_ray_train` starts: Ray Train owns the process group there.
RAY_WORKER_ENV = "IMAT_RAY_TRAIN_WORKER"


def in_ray_train_worker() -> bool:
    return os.environ.get(RAY_WORKER_ENV) == "1"


def local_device() -> torch.device:
    """This rank's own GPU: Ray Train's choice in a Ray Train worker (it knows which of the node's shared
    ``CUDA_VISIBLE_DEVICES`` it was given), else ``cuda:LOCAL_RANK`` (torchrun)."""
    if in_ray_train_worker():
        import ray.train.torch

        return torch.device(ray.train.torch.get_device())
    return torch.device("cuda", local_rank())


def process_device(name: str | torch.device = "auto") -> torch.device:
    """The device this process trains on, bound as the current CUDA device.

    One process: :func:`imat.engine.runtime.resolve_device`. Distributed on CUDA, ``auto``/``cuda``
    (no index) become this rank's own GPU (:func:`local_device`), made current with
    ``torch.cuda.set_device`` so NCCL collectives and bare ``.cuda()`` calls use it too."""
    from imat.engine.runtime import resolve_device

    device = resolve_device(name)
    if device.type != "cuda" or not is_distributed():
        return device
    if device.index is None:
        device = local_device()
        if device.type != "cuda" or device.index is None:
            raise ImatError(f"distributed rank {rank()}: expected its own GPU, got device {device}")
    if device.index >= torch.cuda.device_count():
        raise ImatError(
            f"rank {rank()}: device {device} does not exist ({torch.cuda.device_count()} visible GPU(s))"
        )
    torch.cuda.set_device(device)
    return device


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Join the process group that ``torchrun`` (or any launcher setting ``RANK``/``WORLD_SIZE``/
    ``MASTER_ADDR``/``MASTER_PORT``) describes; a no-op for a single process or a group that Ray Train
    (or the caller) already initialised. Returns :func:`is_distributed`.

    The backend is NCCL when CUDA is available and gloo otherwise (``IMAT_DIST_BACKEND`` overrides);
    on a GPU the process binds to ``cuda:LOCAL_RANK`` so ``device=auto`` means its own GPU.
    """
    d = _dist()
    if not d.is_available():
        return False
    if d.is_initialized():
        return is_distributed()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ImatError(f"WORLD_SIZE>1 but {', '.join(missing)} not set: launch with torchrun")
    cuda = torch.cuda.is_available()
    backend = backend or os.environ.get("IMAT_DIST_BACKEND") or ("nccl" if cuda else "gloo")
    if cuda and backend == "nccl":
        torch.cuda.set_device(local_rank())
    d.init_process_group(backend=backend, init_method="env://", timeout=_dt.timedelta(seconds=timeout_s))
    log.info("distributed: rank %d of %d (%s)", d.get_rank(), d.get_world_size(), backend)
    return is_distributed()


def barrier() -> None:
    if is_distributed():
        _dist().barrier()


def cleanup() -> None:
    """Leave the process group (end of a torchrun job)."""
    d = _dist()
    if d.is_available() and d.is_initialized():
        d.destroy_process_group()


def main_only(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run ``fn`` on rank 0 only (returns None elsewhere); for writers outside the engine."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if rank() == 0 else None

    wrapper.__doc__, wrapper.__name__ = fn.__doc__, fn.__name__
    return wrapper


# --- data ----------------------------------------------------------------------------------------------


class ShardedSampler(Sampler[int]):
    """Rank ``rank``'s share of ``base``'s order: indices ``rank, rank + world, ...``.

    Works over any sampler (random, sequential, class-balanced), so the engine's per-epoch reseeding of
    the base sampler's generator gives every rank the same permutation and disjoint shares. With
    ``pad`` the order is extended by wrapping around until its length divides by ``world`` (what
    ``DistributedSampler`` does), so every rank trains the same number of steps.
    """

    def __init__(
        self, base: Iterable[int], rank: int, world: int, pad: bool = True, loader_draw: bool = False
    ) -> None:
        self.base, self.rank, self.world, self.pad = base, rank, world, pad
        # the unsharded loader drew its workers' base seed from the order's generator before the order
        # (a DataLoader shuffling with ``generator=``): draw it too, so N ranks split that very order
        self.loader_draw = loader_draw

    @property
    def generator(self) -> torch.Generator | None:
        return getattr(self.base, "generator", None)

    def set_epoch(self, epoch: int) -> None:
        if callable(getattr(self.base, "set_epoch", None)):
            self.base.set_epoch(epoch)

    def _total(self) -> int:
        n = len(self.base)  # type: ignore[arg-type]
        return math.ceil(n / self.world) * self.world if self.pad else n

    def __len__(self) -> int:
        total = self._total()
        return total // self.world if self.pad else len(range(self.rank, total, self.world))

    def __iter__(self) -> Iterator[int]:
        if self.loader_draw and isinstance(self.generator, torch.Generator):
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = list(iter(self.base))
        total = self._total()
        if self.pad and order:
            while len(order) < total:
                order += order[: total - len(order)]
        return iter(order[self.rank : total : self.world])


def shard_loader(loader: Any, pad: bool = True) -> Any:
    """The same loader (class, dataset, batch size, collate, workers, generator) over this rank's
    :class:`ShardedSampler`; unchanged when not distributed."""
    if not is_distributed():
        return loader
    if not isinstance(loader, DataLoader):
        raise ImatError(f"distributed training needs torch DataLoaders to shard, got {type(loader).__name__}")
    if loader.batch_size is None:
        raise ImatError("distributed training cannot shard a loader with a custom batch_sampler")
    if isinstance(loader.sampler, ShardedSampler):
        return loader
    base = loader.sampler
    shared = loader.generator is not None and getattr(base, "generator", None) is loader.generator
    if hasattr(base, "generator") and base.generator is None:
        # a random sampler without a generator would draw its order from the global RNG, which is
        # rank-local (see imat.engine.loop): give it one, which the engine seeds alike on every rank
        base.generator = torch.Generator()
    sampler = ShardedSampler(base, rank(), world_size(), pad=pad, loader_draw=shared)
    sharded = type(loader)(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        # its own generator (the workers' base seed, seeded per rank), apart from the sampler's (shared)
        generator=torch.Generator(),
        persistent_workers=loader.persistent_workers,
    )
    if getattr(loader, "device_normalize", None) is not None:  # uint8 batches normalised on the GPU
        sharded.device_normalize = loader.device_normalize
    return sharded


# --- reductions ----------------------------------------------------------------------------------------


def _coalesced_all_reduce(tensors: list[torch.Tensor], average: bool) -> None:
    """Sum (or average) ``tensors`` in place across ranks with one all_reduce per dtype/device."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    world = world_size()
    for group in groups.values():
        flat = _flatten_dense_tensors(group)
        _dist().all_reduce(flat)
        if average:
            flat /= world
        for t, synced in zip(group, _unflatten_dense_tensors(flat, group), strict=True):
            t.copy_(synced)


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Replace each parameter's gradient by its mean over all ranks (a no-op for one process).

    Parameters without a gradient are skipped; a step must therefore give gradients to the same
    parameters on every rank, which holds for the engine's tasks (the graph does not depend on data).
    """
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        _coalesced_all_reduce([g if g.is_contiguous() else g.contiguous() for g in grads], average=True)


def sum_across_ranks(values: Mapping[str, Any], device: torch.device | str = "cpu") -> dict[str, float]:
    """``{key: sum over ranks of float(value)}`` for the same keys on every rank (sorted for the
    collective's order)."""
    keys = sorted(values)
    if not is_distributed():
        return {k: float(values[k]) for k in keys}
    dev = torch.device(device)
    if _dist().get_backend() == "nccl" and dev.type != "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    vec = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=dev)
    _dist().all_reduce(vec)
    return dict(zip(keys, vec.cpu().tolist(), strict=True))


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` for one process). For this
    process's own values only (it pickles them across ranks)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def max_across_ranks(value: float, device: torch.device | str = "cpu") -> float:
    if not is_distributed():
        return float(value)
    dev = torch.device(device)
    if _dist().get_backend() == "nccl" and dev.type != "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([float(value)], dtype=torch.float64, device=dev)
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    return float(t.item())


def shard_rows(n: int) -> range:
    """The rows of an ``n``-row job this rank does when work that is not training (evaluation, the
    teacher cache) is split over ranks: every world-th row from its rank (all rows in one process)."""
    return range(rank(), n, world_size())


def sum_rows_across_ranks_(
    tensor: torch.Tensor, device: torch.device | str = "cpu", chunk_mb: int = 64
) -> None:
    """In place on every rank: the element-wise sum of ``tensor`` over ranks, for the result of work
    split with :func:`shard_rows` (each rank fills its rows and leaves the others zero). The tensor
    (contiguous, on the CPU) goes through ``device`` (NCCL reduces CUDA tensors only) in chunks of at
    most ``chunk_mb`` MiB, so a rank never holds more than the result and one chunk."""
    if not is_distributed():
        return
    dev = torch.device(device)
    if _dist().get_backend() == "nccl" and dev.type != "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    if not tensor.is_contiguous():
        raise ValueError("sum_rows_across_ranks_ needs a contiguous tensor")
    flat = tensor.view(-1)
    step = max(1, (chunk_mb << 20) // max(1, tensor.element_size()))
    for start in range(0, flat.numel(), step):
        part = flat[start : start + step]
        buf = part.to(dev)  # on the CPU: the slice itself, reduced in place
        _dist().all_reduce(buf)
        if buf.data_ptr() != part.data_ptr():
            part.copy_(buf)


def reduce_topk_meter(meter: Any) -> None:
    """Sum a :class:`imat.metrics.TopKMeter`'s counts (hits per k, loss sum, n) over all ranks in place,
    so ``compute()`` gives the metrics of the whole (sharded) validation set."""
    if not is_distributed():
        return
    keys = [f"hit{k}" for k in meter.ks]
    values = {f"hit{k}": float(meter._hits[k]) for k in meter.ks}
    values["loss_sum"] = float(meter._loss_sum)
    values["n"] = float(meter._n)
    total = sum_across_ranks(values)
    for k, key in zip(meter.ks, keys, strict=True):
        meter._hits[k] = int(round(total[key]))
    meter._loss_sum = total["loss_sum"]
    meter._n = int(round(total["n"]))


def average_norm_stats(modules: Mapping[str, nn.Module]) -> None:
    """Average BatchNorm running means and variances over all ranks (timm's ``distribute_bn`` with
    ``reduce=True``): every rank normalised its own shard, so the mean of their statistics describes the
    whole epoch's data, where copying rank 0's would describe one shard."""
    if not is_distributed():
        return
    from timm.utils import distribute_bn

    for module in modules.values():
        distribute_bn(module, world_size(), reduce=True)


def convert_sync_batchnorm(modules: Mapping[str, nn.Module]) -> None:
    """Replace every BatchNorm of ``modules`` by a SyncBatchNorm, in place (parameters and buffers are
    shared). timm's converter, not torch's: torch's turns timm's fused ``BatchNormAct2d`` (EfficientNet,
    many timm nets) into a bare SyncBatchNorm and silently drops its activation and drop layers."""
    from timm.layers import convert_sync_batchnorm as timm_convert

    for name, module in modules.items():
        if timm_convert(module) is not module:  # a bare BatchNorm cannot be replaced in place
            raise ImatError(f"train.sync_bn: module {name!r} is itself a BatchNorm; wrap it in a container")


def broadcast_modules(modules: Mapping[str, nn.Module], src: int = 0, buffers_only: bool = False) -> None:
    """Copy rank ``src``'s parameters (unless ``buffers_only``) and buffers of every module to all ranks."""
    if not is_distributed():
        return
    for module in modules.values():
        tensors = [] if buffers_only else [p.data for p in module.parameters()]
        tensors += [b for b in module.buffers()]
        for t in tensors:
            _dist().broadcast(t, src)


# --- DistributedDataParallel ------------------------------------------------------------------------------


class TaskStep(nn.Module):
    """A task's ``step`` as a module over its trained modules, so DDP can wrap the whole step: DDP hooks
    the gradients of every parameter of ``task.modules()`` (the student and, in MEAL's grl/joint modes,
    the discriminators) and the step may call ``forward_intermediates`` or several heads inside."""

    def __init__(self, task: Any) -> None:
        super().__init__()
        self.trained = nn.ModuleDict(dict(task.modules()))
        self.task = task  # not a Module: a plain attribute, not registered

    def forward(self, batch: dict[str, Any], ctx: Any) -> Any:
        return self.task.step(batch, ctx)


def wrap_ddp(task: Any, device: torch.device, accumulate: bool = False) -> nn.Module | None:
    """``DistributedDataParallel(TaskStep(task))`` for a task with one backward per step when
    distributed, else None (one process, or a task that optimises by hand).

    ``broadcast_buffers=False``: every rank keeps its own BatchNorm statistics during the epoch and the
    engine averages them at its end (:func:`average_norm_stats`). ``static_graph`` (the task's
    ``ddp_static_graph``, default True) lets a step leave some parameters without a gradient as long as
    it is always the same ones (e.g. MEAL on intermediate blocks only: the classifier head is unused);
    a task whose used parameters change from step to step sets it False and DDP then searches the graph
    for unused parameters every step (``find_unused_parameters``).

    ``accumulate`` (``train.accum_steps > 1``, whose accumulating steps run under ``no_sync``) turns
    ``static_graph`` off and ``find_unused_parameters`` on: static_graph with ``no_sync`` fails an
    internal assert in the reducer, or silently stops reducing from the second iteration (known,
    unfixed upstream behaviour of DDP's static graph with skipped synchronisations)."""
    if not is_distributed() or getattr(task, "manual_optimization", False):
        return None
    step = TaskStep(task)
    if not any(p.requires_grad for p in step.parameters()):
        return None
    static = bool(getattr(task, "ddp_static_graph", True)) and not accumulate
    return nn.parallel.DistributedDataParallel(
        step,
        device_ids=[device.index] if device.type == "cuda" and device.index is not None else None,
        broadcast_buffers=False,
        static_graph=static,
        find_unused_parameters=not static,
    )


# --- Ray Train -----------------------------------------------------------------------------------------
