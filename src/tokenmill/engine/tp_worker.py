"""A tensor-parallel worker (ranks 1..N-1): joins the group, loads its shard, runs the steps
the driver broadcasts. The same function runs in a spawned process and in a Ray actor."""

from __future__ import annotations

import dataclasses
import os
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tokenmill.config import EngineConfig
from tokenmill.layers.tensor_parallel import TPGroup
from tokenmill.worker.shm_broadcast import CONNECTING, FAILED, READY, ShmBroadcast, pid_alive

STARTUP_TIMEOUT_S = 300.0  # joining the group and loading the model, on every rank
STEP_TIMEOUT_S = 20.0  # a step's collectives and broadcast wait at most this for a rank


@dataclass(frozen=True)
class WorkerArgs:
    config: EngineConfig
    rank: int
    world_size: int
    port: int
    shm_name: str
    slot_bytes: int
    num_slots: int
    driver_pid: int
    num_threads: int


def join_group(
    rank: int,
    world_size: int,
    device: str,
    store: dist.Store,
    step_timeout_s: float,
    expert_parallel: bool = False,
) -> TPGroup:
    """Joins the default (gloo, start-up timeout) group through `store`, then the group of
    the step collectives: NCCL on CUDA, gloo on the CPU, with the step timeout."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every rank is on this host
    dist.init_process_group(
        "gloo",
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
    )
    backend = "nccl" if device.startswith("cuda") else "gloo"
    group = dist.new_group(
        list(range(world_size)), timeout=timedelta(seconds=step_timeout_s), backend=backend
    )
    return TPGroup(rank, world_size, group, expert_parallel)


def worker_main(args: WorkerArgs) -> None:
    """Runs until the driver stops the queue or its process is gone. A start-up failure is
    written to the queue's error area (the driver reports it) and re-raised."""
    # imported here: a spawned process imports this module before anything else
    from tokenmill.engine.runner_setup import make_runner
    from tokenmill.loader.model_loader import load_model
    from tokenmill.worker.tp_runner import run_worker_steps

    reader = args.rank - 1
    channel = ShmBroadcast(
        args.world_size - 1, args.slot_bytes, args.num_slots, name=args.shm_name, reader=reader
    )
    try:
        torch.set_num_threads(args.num_threads)
        config = args.config
        if config.device.startswith("cuda"):
            torch.cuda.set_device(args.rank)
            config = dataclasses.replace(config, device=f"cuda:{args.rank}")
        channel.set_state(reader, CONNECTING)
        store = dist.TCPStore(
            "127.0.0.1", args.port, args.world_size, is_master=False,
            timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
        )  # fmt: skip
        tp = join_group(
            args.rank, args.world_size, config.device, store, STEP_TIMEOUT_S,
            config.enable_expert_parallel,
        )  # fmt: skip
        runner = make_runner(config, load_model(config), tp=tp)
    except BaseException as e:
        channel.set_state(reader, FAILED, f"rank {args.rank}: {type(e).__name__}: {e}")
        traceback.print_exc()
        channel.close()
        raise
    channel.set_state(reader, READY)
    try:
        run_worker_steps(runner, channel, lambda: pid_alive(args.driver_pid))
    finally:
        channel.close()
        if dist.is_initialized():
            dist.destroy_process_group()
