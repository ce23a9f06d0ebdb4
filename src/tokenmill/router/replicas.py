"""Data-parallel replicas: N `tokenmill serve` children on private localhost ports.

Each child is a whole server (its own engine, KV cache and prefix cache) started with the
parent's engine and server flags, a port of its own and a share of the CPU threads, so that N
replicas share the host's cores instead of each taking all of them; where the process may use
as many cores as there are threads, each child is pinned to its own. A child that exits is
started again (on the same port) after a pause that doubles while it keeps failing; the
router's health checks take it out of the rotation meanwhile. On Linux a child gets SIGTERM
when the parent dies, so none outlive it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

logger = logging.getLogger(__name__)


def split_threads(total: int, n: int) -> list[int]:
    """Threads per replica: `total` shared out evenly, at least one each."""
    if n < 1:
        raise ValueError(f"data_parallel_size must be >= 1, got {n}")
    base, extra = divmod(max(total, n), n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def split_cores(available: list[int], threads: list[int]) -> list[list[int]] | None:
    """Disjoint core sets, one per replica, as many cores as its threads; None when the cores
    the process may use are fewer than the threads (then nobody is pinned)."""
    if sum(threads) > len(available):
        return None
    cores, out = sorted(available), []
    for t in threads:
        out.append(cores[:t])
        cores = cores[t:]
    return out


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _child_setup(cores: list[int] | None) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass
        if cores:
            os.sched_setaffinity(0, cores)

    return setup


@dataclass
class Replica:
    index: int
    port: int
    threads: int
    cores: list[int] | None = None  # pinned to these, when the host has enough
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0  # in a row, each within a minute of its start: the backoff grows

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class ReplicaSet:
    def __init__(self, serve_args: list[str], n: int, total_threads: int) -> None:
        self.serve_args = serve_args
        threads = split_threads(total_threads, n)
        self.replicas = [Replica(i, free_port(), t) for i, t in enumerate(threads)]
        if sys.platform.startswith("linux"):
            cores = split_cores(sorted(os.sched_getaffinity(0)), threads)
            for r, c in zip(self.replicas, cores or [None] * n, strict=True):
                r.cores = c
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True, name="replica-watch")

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def command(self, r: Replica) -> list[str]:
        return [
            sys.executable, "-m", "tokenmill", "serve", *self.serve_args,
            "--host", "127.0.0.1", "--port", str(r.port), "--num-threads", str(r.threads),
        ]  # fmt: skip

    def start(self) -> None:
        for r in self.replicas:
            self._spawn(r)
        self._watcher.start()

    def _spawn(self, r: Replica) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(r.threads))
        preexec = _child_setup(r.cores) if sys.platform.startswith("linux") else None
        r.proc = subprocess.Popen(self.command(r), env=env, preexec_fn=preexec)  # noqa: PLW1509
        r.started_at = time.monotonic()
        pinned = f", cores {r.cores}" if r.cores else ""
        logger.warning(
            "replica %d: pid %d on %s, %d threads%s", r.index, r.proc.pid, r.url, r.threads, pinned
        )

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(self.replicas)
        while pending:
            for r in list(pending):
                assert r.proc is not None
                if r.proc.poll() is not None and not self._stopping.is_set():
                    raise RuntimeError(f"replica {r.index} exited with {r.proc.returncode}")
                try:
                    if httpx.get(f"{r.url}/health", timeout=2).status_code == 200:
                        pending.remove(r)
                except httpx.TransportError:
                    pass
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"replicas {[r.index for r in pending]} not up in {timeout_s}s")
            if pending:
                time.sleep(0.25)

    def _watch(self) -> None:
        due: dict[int, float] = {}  # replica index -> when to start it again
        while not self._stopping.wait(0.5):
            now = time.monotonic()
            for r in self.replicas:
                if r.proc is None or r.proc.poll() is None or self._stopping.is_set():
                    continue
                if r.index not in due:
                    # one that keeps failing at start (a taken port, a bad flag) backs off
                    r.restarts = r.restarts + 1 if now - r.started_at < 60 else 1
                    delay = min(30.0, 0.5 * 2 ** (r.restarts - 1))
                    due[r.index] = now + delay
                    logger.warning(
                        "replica %d exited with %s; starting it again in %.1f s",
                        r.index, r.proc.returncode, delay,
                    )  # fmt: skip
                elif now >= due[r.index]:
                    del due[r.index]
                    self._spawn(r)

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        procs = [r.proc for r in self.replicas if r.proc is not None and r.proc.poll() is None]
        for p in procs:
            p.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
