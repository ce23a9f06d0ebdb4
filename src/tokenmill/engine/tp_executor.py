"""The driver's side of tensor parallelism: starts ranks 1..N-1 (spawned processes or Ray
actors), joins the group as rank 0, and watches the workers.

Start-up: the driver opens the rendezvous store first (a port in use fails here, before any
worker starts), creates the broadcast queue, starts the workers, waits until each has
connected, then joins the group. Every rank then builds its runner; the KV cache size is
agreed between them. Health: the engine is unhealthy as soon as a worker has died or failed;
a step waits at most `STEP_TIMEOUT_S` for a rank (collective and queue timeouts), then raises,
which fails the engine and its in-flight requests.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.engine.tp_worker import (
    STARTUP_TIMEOUT_S,
    STEP_TIMEOUT_S,
    WorkerArgs,
    join_group,
    worker_main,
)
from tokenmill.models.tp_shard import check_splittable
from tokenmill.worker.shm_broadcast import CONNECTING, FAILED, ShmBroadcast
from tokenmill.worker.tp_runner import step_message_bytes

logger = logging.getLogger(__name__)
# An idle worker shows it is alive about every second; this long without a sign, it is hung.
IDLE_HANG_S = 10.0


class DistributedStartupError(RuntimeError):
    """The tensor-parallel group could not start (the message says why)."""


def threads_per_rank(config: EngineConfig) -> int:
    """Each rank's torch threads: the configured count, else the host's cores shared out."""
    if config.num_threads:
        return config.num_threads
    return max(1, len(os.sched_getaffinity(0)) // config.tensor_parallel_size)


class TPExecutor:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, max_model_len: int):
        n = config.tensor_parallel_size
        check_splittable(model_config, n, config.enable_expert_parallel)
        if dist.is_initialized():
            raise DistributedStartupError(
                "this process already runs a torch.distributed group (another tensor-parallel "
                "engine?): one tensor-parallel engine per process; shut the other down first"
            )
        if config.device.startswith("cuda") and torch.cuda.device_count() < n:
            raise DistributedStartupError(
                f"tensor_parallel_size {n} needs {n} GPUs; {torch.cuda.device_count()} visible"
            )
        self.world_size = n
        self.backend = config.distributed_executor_backend
        self.workers: list[Any] = []
        self._refs: list[Any] = []
        self._closed = False
        self._ray_checked, self._ray_dead = 0.0, []
        port = config.distributed_port or 0
        try:
            self.store = dist.TCPStore(
                "127.0.0.1", port, n, is_master=True,
                timeout=timedelta(seconds=STARTUP_TIMEOUT_S), wait_for_workers=False,
            )  # fmt: skip
        except (RuntimeError, OSError) as e:
            raise DistributedStartupError(
                f"distributed_port {port}: cannot listen on 127.0.0.1:{port} ({e}); pick a "
                "free port or leave it unset"
            ) from e
        max_blocks = -(-max_model_len // config.block_size)
        slot = step_message_bytes(config.max_num_batched_tokens, config.max_num_seqs, 4, max_blocks)
        self.channel = ShmBroadcast(n - 1, slot)
        threads = threads_per_rank(config)
        torch.set_num_threads(threads)
        args = [
            WorkerArgs(config, r, n, self.store.port, self.channel.name, slot,
                       self.channel.num_slots, os.getpid(), threads)
            for r in range(1, n)
        ]  # fmt: skip
        try:
            self._start(args)
            self._wait_connected()
            self.tp = join_group(
                0, n, config.device, self.store, STEP_TIMEOUT_S, config.enable_expert_parallel
            )
        except BaseException:
            self.shutdown()
            raise
        atexit.register(self.shutdown)
        logger.info("tensor parallel: %d ranks (%s), %d threads each", n, self.backend, threads)

    # -- workers -------------------------------------------------------------------------------
    def _start(self, args: list[WorkerArgs]) -> None:
        if self.backend == "ray":
            self._start_ray(args)
            return
        ctx = mp.get_context("spawn")
        for a in args:
            p = ctx.Process(target=worker_main, args=(a,), name=f"tp-rank{a.rank}", daemon=True)
            p.start()
            self.workers.append(p)

    def _start_ray(self, args: list[WorkerArgs]) -> None:
        try:
            import ray
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError as e:
            raise DistributedStartupError(
                "distributed_executor_backend 'ray' needs ray (pip install ray)"
            ) from e
        if not ray.is_initialized():
            ray.init()
        # one host: the broadcast queue is shared memory
        self._pg = placement_group([{"CPU": 1}] * len(args), strategy="STRICT_PACK")
        try:
            ray.get(self._pg.ready(), timeout=STARTUP_TIMEOUT_S)
        except Exception as e:
            raise DistributedStartupError(
                f"Ray could not place {len(args)} tensor-parallel workers of 1 CPU each on one "
                f"node ({e})"
            ) from e
        actor_cls = ray.remote(num_cpus=1)(RayTPWorker)
        for i, a in enumerate(args):
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=self._pg, placement_group_bundle_index=i
            )
            actor = actor_cls.options(scheduling_strategy=strategy).remote()
            self.workers.append(actor)
            self._refs.append(actor.run.remote(a))

    def _dead(self) -> list[int]:
        """Ranks whose process has exited (or whose Ray actor has died)."""
        if self.backend == "ray":  # asked at most twice a second: every step asks
            now = time.monotonic()
            if now - self._ray_checked > 0.5:
                import ray

                done, _ = ray.wait(self._refs, num_returns=len(self._refs), timeout=0)
                self._ray_dead = [self._refs.index(r) + 1 for r in done]
                self._ray_checked = now
            return self._ray_dead
        return [i + 1 for i, p in enumerate(self.workers) if not p.is_alive()]

    def _failures(self) -> str:
        errors = [
            self.channel.error(r) or f"rank {r + 1} failed"
            for r in range(self.world_size - 1)
            if self.channel.state(r) == FAILED
        ]
        dead = [r for r in self._dead() if self.channel.state(r - 1) != FAILED]
        errors += [f"rank {r} exited" for r in dead]
        errors += [
            f"rank {r + 1} has not responded for {idle:.0f}s"
            for r in range(self.world_size - 1)
            if (idle := self.channel.idle_for(r)) > IDLE_HANG_S
        ]
        return "; ".join(errors)

    def _wait_connected(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while any(self.channel.state(r) < CONNECTING for r in range(self.world_size - 1)):
            failed = self._failures()
            if failed:
                raise DistributedStartupError(f"tensor-parallel workers failed: {failed}")
            if time.monotonic() > deadline:
                raise DistributedStartupError("tensor-parallel workers did not start in time")
            time.sleep(0.02)

    def startup_error(self, error: BaseException) -> DistributedStartupError:
        """The error to raise when rank 0's runner failed to build: the workers' own."""
        time.sleep(0.5)  # a worker that failed first writes its error before exiting
        failed = self._failures()
        return DistributedStartupError(f"tensor-parallel start-up failed: {failed or error!r}")

    # -- health --------------------------------------------------------------------------------
    def health_error(self) -> str | None:
        """None while every worker runs, else what went wrong (cheap: /health asks)."""
        if self._closed:
            return "tensor-parallel workers shut down"
        failed = self._failures()
        return f"tensor-parallel worker down: {failed}" if failed else None

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        self.channel.stop()
        if self.backend == "ray":
            import ray

            for actor in self.workers:
                ray.kill(actor)
            pg = getattr(self, "_pg", None)
            if pg is not None:
                ray.util.remove_placement_group(pg)
        else:
            for p in self.workers:
                p.join(timeout=5)
                if p.is_alive():
                    p.terminate()
        self.workers, self._refs = [], []
        if dist.is_initialized():
            dist.destroy_process_group()
        self.channel.close(unlink=True)


class RayTPWorker:
    """The Ray actor of one rank: `run` holds the actor until the driver stops it."""

    def run(self, args: WorkerArgs) -> None:
        worker_main(args)
