"""Where the work runs: the device `compute.device` names (`resolve_device`, the one device resolver), and one Dask
runner for every stage that maps work over partitions (collect, dedup), with one rule for when a cluster is worth
starting (`DaskRunner.wants_cluster`).

`DaskRunner(compute)` runs `fn(*shared, *item)` over many items, in this process or on a Dask cluster that it
starts on first need: the scheduler named by `compute.dask_scheduler` to scale out, otherwise a local cluster
of `compute.dask_workers` processes whose scheduler, workers and dashboard listen on 127.0.0.1 only (a local
cluster needs no other interface). Results come back in completion order; a task's exception is re-raised in
the caller with its traceback. Leaving the `with` block closes what it started.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from clip.config import ComputeConfig

if TYPE_CHECKING:
    import torch


class DeviceUnavailable(ValueError):
    """`compute.device` asks for a device this machine does not have."""


def _device_type(device: str) -> str:
    """'cuda' or 'cpu' for a `compute.device` value (the rule of `resolve_device`)."""
    if device == "cpu":
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise DeviceUnavailable("compute.device is 'cuda' but no CUDA device is available (torch.cuda.is_available() "
                                "is false); set compute.device=cpu or auto")
    return "cuda" if available else "cpu"


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """The torch device a process uses for a `compute.device` value: `auto` takes CUDA when torch sees a GPU;
    `cuda` without one is refused in one line (DeviceUnavailable) here, where the device is chosen, before any model
    or data exists. On CUDA, process `local_rank` of a node takes GPU `local_rank % device_count` and makes it the
    current device (what NCCL and `torch.cuda` calls without an index then use)."""
    import torch

    if _device_type(device) == "cuda":
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


class DaskRunner(AbstractContextManager):
    """Runs task functions over many argument tuples, in process or on a Dask cluster started on first need."""

    def __init__(self, compute: ComputeConfig, force_dask: bool | None = None) -> None:
        self.compute = compute
        self.force_dask = force_dask  # True / False override the size rule of `wants_cluster`
        self.client: Any = None
        self.cluster: Any = None

    def wants_cluster(self, num_items: int, minimum: int) -> bool:
        """Whether `num_items` are worth a cluster: always with a configured scheduler, never with one worker."""
        if self.force_dask is not None:
            return self.force_dask
        if self.compute.dask_scheduler:
            return True
        return self.compute.dask_workers > 1 and num_items >= minimum

    def client_or_start(self) -> Any:
        """The Dask client, connecting to (or starting) the cluster on first call."""
        if self.client is None:
            from dask.distributed import Client, LocalCluster

            if self.compute.dask_scheduler:
                self.client = Client(self.compute.dask_scheduler)
            else:
                self.cluster = LocalCluster(
                    n_workers=self.compute.dask_workers, threads_per_worker=self.compute.threads_per_worker,
                    processes=True, silence_logs=40, host="127.0.0.1", dashboard_address="127.0.0.1:0",
                )
                self.client = Client(self.cluster)
        return self.client

    def run(self, fn: Callable[..., Any], shared: tuple[Any, ...], items: Iterable[tuple[Any, ...]],
            parallel: bool) -> Iterator[Any]:
        """fn(*shared, *item) for every item; results in completion order. `shared` is sent to workers once."""
        items = list(items)
        if not parallel:
            for item in items:
                yield fn(*shared, *item)
            return
        from dask.distributed import as_completed

        client = self.client_or_start()
        # hash=False: a fresh key per scatter, so releasing an earlier step's copy cannot drop this one.
        shared_futures = [client.scatter(obj, broadcast=True, hash=False) for obj in shared]
        futures = [client.submit(fn, *shared_futures, *item, pure=False) for item in items]
        try:
            for future in as_completed(futures):
                yield future.result()  # re-raises a task's exception here, with its traceback
        finally:
            client.cancel(futures + shared_futures)

    def __exit__(self, *exc_info: object) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
