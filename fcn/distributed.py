"""Predict and evaluate on many processes, GPUs and nodes: ``torchrun`` starts them, this module joins them
(``WORLD_SIZE`` > 1): one process group (:func:`process_group`), each rank's share of the inputs
(:func:`split_balanced`, the same on every rank), the results gathered (:func:`all_gather`)."""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class DistributedError(ValueError):
    """A torchrun environment that cannot be used (a bad ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``)."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: ``rank`` of ``size``, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints the summary and writes the report."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env(environ: Mapping[str, str] | None = None) -> World:
    """The :class:`World` of ``torchrun``'s ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (one process when
    ``WORLD_SIZE`` is unset or 1)."""
    env = os.environ if environ is None else environ
    values = []
    for name, default in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)):
        try:
            values.append(int(env.get(name) or default))  # unset or empty: the default
        except ValueError as err:
            raise DistributedError(
                f"environment variable {name}={env[name]!r} is not an integer; "
                "start the processes with torchrun"
            ) from err
    size, rank, local = values
    if size < 1 or not 0 <= rank < size or local < 0:
        raise DistributedError(
            f"RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local} do not describe a process of a group; "
            "start the processes with torchrun"
        )
    return World(rank=rank, size=size, local_rank=local) if size > 1 else World()


def rank_device(device: str, world: World) -> str:
    """This rank's ``--device``: ``auto`` / ``cuda`` become ``cuda:LOCAL_RANK`` under torchrun with CUDA."""
    if world.distributed and device in ("auto", "cuda") and torch.cuda.is_available():
        if world.local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {world.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU (--nproc_per_node)"
            )
        return f"cuda:{world.local_rank}"
    return device


@contextmanager
def process_group(device: torch.device, world: World) -> Iterator[World]:
    """Join the ranks for the ``with`` block: NCCL for a CUDA ``device`` (made the current one), else gloo.
    Nothing for one process, or when the caller opened a group already (it stays open)."""
    if not world.distributed or dist.is_initialized():
        yield world
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield world
    finally:
        dist.destroy_process_group()


def split_balanced(weights: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of ``weights`` dealt into ``parts`` shares of nearly equal total weight, each in increasing
    order: the heaviest first, to the lightest share (ties: the lower index, the lower share). Integer
    weights, so every rank computes the same split."""
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    order = sorted(range(len(weights)), key=lambda i: (-int(weights[i]), i))
    loads = [(0, share) for share in range(parts)]
    shares: list[list[int]] = [[] for _ in range(parts)]
    for i in order:
        load, share = heapq.heappop(loads)
        shares[share].append(i)
        heapq.heappush(loads, (load + int(weights[i]), share))
    return [sorted(s) for s in shares]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
