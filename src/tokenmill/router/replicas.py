"""Data-parallel replicas: N `tokenmill serve` children on private localhost ports.

Each child is a whole server (its own engine, KV cache and prefix cache) started with the
parent's engine and server flags, a port of its own and a share of the CPU threads, so that N
replicas share the host's cores instead of each taking all of them. A child that exits is
started again (on the same port) after a short pause; the router's health checks take it out of
the rotation meanwhile. On Linux a child gets SIGTERM when the parent dies, so none outlive it.
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
from dataclasses import dataclass

import httpx

logger = logging.getLogger(__name__)


def split_threads(total: int, n: int) -> list[int]:
    """Threads per replica: `total` shared out evenly, at least one each."""
    if n < 1:
        raise ValueError(f"data_parallel_size must be >= 1, got {n}")
    base, extra = divmod(max(total, n), n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Replica:
    index: int
    port: int
    threads: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class ReplicaSet:
    def __init__(self, serve_args: list[str], n: int, total_threads: int) -> None:
        self.serve_args = serve_args
        self.replicas = [
            Replica(i, free_port(), t) for i, t in enumerate(split_threads(total_threads, n))
        ]
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
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        r.proc = subprocess.Popen(self.command(r), env=env, preexec_fn=preexec)  # noqa: PLW1509
        logger.warning(
            "replica %d: pid %d on %s, %d threads", r.index, r.proc.pid, r.url, r.threads
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
        while not self._stopping.wait(1.0):
            for r in self.replicas:
                if r.proc is not None and r.proc.poll() is not None and not self._stopping.is_set():
                    logger.warning(
                        "replica %d exited with %s; starting it again", r.index, r.proc.returncode
                    )
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
