"""Data-parallel training for the engine: ``torchrun`` on one machine, Ray Train across machines.

The engine does not wrap the model in ``torch.nn.parallel.DistributedDataParallel``: a task may call
``forward_intermediates`` (MEAL), train several modules with several optimisers and backward passes
per step (the discriminators), none of which fits DDP's one-forward/one-backward hook. Instead every
optimiser step averages the gradients of exactly the parameters it is about to update over all ranks
(one coalesced ``all_reduce`` per dtype), which is what DDP computes, without the overlap of
communication and backward that DDP adds on GPUs. What the engine does when ``world_size() > 1``:

* parameters and buffers of every task module are broadcast from rank 0 when ``fit`` starts (and after
  a resume), so all ranks start identical; BatchNorm buffers are broadcast again at every epoch end
  (DDP's ``broadcast_buffers`` does it every forward), so evaluation and checkpoints see rank 0's stats;
* the training loader is re-built over a :class:`ShardedSampler` (rank r takes every world-th index of
  the sampler's order, padded to equal length so every rank runs the same number of steps); the
  validation loader is sharded without padding; ``batch_size`` is per process;
* epoch sums (losses, images, skipped) and validation counts (hits, loss, n) are summed across ranks,
  so ``summary.csv`` has the same columns and meaning as one process;
* only rank 0 writes (``summary.csv``, ``last.ckpt``, ``best.safetensors``, TensorBoard), followed by a
  barrier so no rank races ahead of a checkpoint.

Frozen teachers take no part: they have no optimiser, so nothing of theirs is reduced.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
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

    def __init__(self, base: Iterable[int], rank: int, world: int, pad: bool = True) -> None:
        self.base, self.rank, self.world, self.pad = base, rank, world, pad

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
    sampler = ShardedSampler(loader.sampler, rank(), world_size(), pad=pad)
    return type(loader)(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
    )


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


def max_across_ranks(value: float, device: torch.device | str = "cpu") -> float:
    if not is_distributed():
        return float(value)
    dev = torch.device(device)
    if _dist().get_backend() == "nccl" and dev.type != "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([float(value)], dtype=torch.float64, device=dev)
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    return float(t.item())


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


def broadcast_modules(modules: Mapping[str, nn.Module], src: int = 0, buffers_only: bool = False) -> None:
    """Copy rank ``src``'s parameters (unless ``buffers_only``) and buffers of every module to all ranks."""
    if not is_distributed():
        return
    for module in modules.values():
        tensors = [] if buffers_only else [p.data for p in module.parameters()]
        tensors += [b for b in module.buffers()]
        for t in tensors:
            _dist().broadcast(t, src)


# --- Ray Train -----------------------------------------------------------------------------------------


def run_ray_train(
    fn: Callable[[dict[str, Any]], Any],
    config: dict[str, Any],
    num_workers: int,
    *,
    use_gpu: bool | None = None,
    cpus_per_worker: float = 1.0,
    address: str | None = None,
    storage: str | None = None,
    name: str = "imat-train",
) -> Any:
    """Run ``fn(config)`` on ``num_workers`` Ray Train workers (a TorchTrainer), each one rank of a
    process group that Ray sets up (gloo on CPUs, NCCL on GPUs); the engine inside ``fn`` then behaves
    exactly as under torchrun. ``use_gpu`` defaults to whether the cluster has GPUs. Returns Ray's
    ``Result``; a failed run raises ImatError with the first line of the worker's error.

    ``fn`` must write to storage every worker sees (rank 0 writes the run directory).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if num_workers < 1:
        raise ImatError(f"--ray-workers must be >= 1, got {num_workers}")
    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
        if address == "local" and os.environ.get("IMAT_RAY_NUM_CPUS"):
            kwargs["num_cpus"] = int(os.environ["IMAT_RAY_NUM_CPUS"])
        ray.init(address=address, **kwargs)
        started = True
    try:
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        trainer = TorchTrainer(
            fn,
            train_loop_config=config,
            scaling_config=ScalingConfig(
                num_workers=num_workers,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": cpus_per_worker},
            ),
            run_config=RunConfig(name=name, storage_path=storage),
        )
        try:
            return trainer.fit()
        except Exception as exc:  # Ray wraps worker failures in several error types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ImatError(f"Ray Train run failed: {first[:300]}") from None
    finally:
        if started:
            ray.shutdown()


def absolute_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A resolved config dict with its paths made absolute, for workers that run elsewhere."""

    def fix(section: dict[str, Any], key: str) -> None:
        value = section.get(key)
        if isinstance(value, str) and value and value != "hub":
            section[key] = str(Path(value).expanduser().resolve())

    fix(raw, "run_dir")
    for key in ("train", "val", "test", "images"):
        fix(raw.get("data", {}), key)
    fix(raw.get("teachers", {}), "dir")
    fix(raw.get("distill", {}), "pool")
    return raw


def _entry_worker(config: dict[str, Any]) -> None:
    """A Ray Train worker: validate the config and call the command's entry (``module:function``)."""
    import importlib

    from imat.config.loader import validate

    module, _, name = config["entry"].partition(":")
    cfg = validate(config["config"], "ray train worker")
    getattr(importlib.import_module(module), name)(cfg, **config.get("kwargs", {}))


def run_entry_on_ray(
    entry: str,
    cfg: Any,
    num_workers: int,
    kwargs: dict[str, Any] | None = None,
    address: str | None = None,
    use_gpu: bool | None = None,
) -> Any:
    """Run a command's entry function (e.g. ``"distill.train:distill"``) as one data-parallel job of
    ``num_workers`` Ray Train workers: ``imat distill --ray-workers N`` and ``imat teachers train
    --ray-workers N``. The run directory must be on storage every worker's node sees."""
    raw = absolute_config(cfg.model_dump(mode="json"))
    storage = str(Path(raw["run_dir"]) / "ray_train")
    return run_ray_train(
        _entry_worker,
        {"entry": entry, "config": raw, "kwargs": dict(kwargs or {})},
        num_workers,
        use_gpu=use_gpu,
        address=address,
        storage=storage,
        name=entry.replace(":", "-").replace(".", "-"),
    )
