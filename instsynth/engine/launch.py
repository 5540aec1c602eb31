"""Detectron2-style ``--num-gpus`` / ``--num-machines`` launching on top of torch.distributed env vars.

Under ``accelerate launch`` or ``torchrun`` (``WORLD_SIZE`` set) the function simply runs. Otherwise,
with more than one process requested, it spawns one process per local GPU and sets ``MASTER_ADDR``,
``MASTER_PORT``, ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` for accelerate to pick up.
"""
from __future__ import annotations

import os
import socket
from typing import Callable
from urllib.parse import urlparse

import torch.multiprocessing as mp

from instsynth.core.io import InstSynthError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, fn: Callable, args: tuple, env: dict, num_gpus: int, machine_rank: int) -> None:
    os.environ.update(env)
    os.environ.update({"LOCAL_RANK": str(local_rank), "RANK": str(machine_rank * num_gpus + local_rank)})
    fn(*args)


def launch(fn: Callable, num_gpus: int = 1, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", args: tuple = ()) -> None:
    """Run ``fn(*args)`` in ``num_gpus`` processes on this machine (one if already distributed)."""
    world = num_gpus * num_machines
    if world <= 1 or "WORLD_SIZE" in os.environ:
        fn(*args)
        return
    if dist_url == "auto":
        if num_machines != 1:
            raise InstSynthError("--dist-url", "'auto' only works on one machine; give tcp://HOST:PORT")
        host, port = "127.0.0.1", free_port()
    else:
        url = urlparse(dist_url)
        if url.scheme != "tcp" or not url.hostname or not url.port:
            raise InstSynthError("--dist-url", f"expected tcp://HOST:PORT or 'auto', got {dist_url!r}")
        host, port = url.hostname, url.port
    env = {"MASTER_ADDR": host, "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(num_gpus)}
    mp.start_processes(_worker, args=(fn, args, env, num_gpus, machine_rank), nprocs=num_gpus, start_method="spawn")
