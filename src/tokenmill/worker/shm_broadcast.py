"""A one-writer, many-reader broadcast queue in shared memory (one host).

The driver pickles each step's message once into the next slot of a ring; every worker reads
the same bytes. Layout (int64 header words, then the slots):

  [0]                 stop flag (1: the writer has shut down)
  [1 + r]             reader r's last sequence number read (its ack)
  [1 + R + r]         reader r's state: 0 starting, 1 connecting, 2 ready, 3 failed
  [1 + 2R + r]        reader r's heartbeat while it waits for a message (CLOCK_MONOTONIC ms;
                      0 while it runs one)
  then per reader an error text area, then per slot: [seq, nbytes, payload...]

A slot is written payload first, then its length, then its sequence number (aligned 8-byte
stores, which x86-64 and ARM64 do not tear or reorder past earlier stores as seen by a
reader that checks the sequence number first and reads the payload after). The writer reuses
a slot only once every reader has acked the message in it, waiting at most `timeout_s`; a
reader polls with short sleeps and gives up when the writer's process is gone.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np

_HEADER_WORDS = 64
_ERROR_BYTES = 4096
STARTING, CONNECTING, READY, FAILED = 0, 1, 2, 3


class BroadcastTimeout(RuntimeError):
    """A reader did not take a message (or the writer sent none) in time."""


class ShmBroadcast:
    def __init__(
        self,
        num_readers: int,
        slot_bytes: int,
        num_slots: int = 4,
        *,
        name: str | None = None,
        reader: int | None = None,
    ) -> None:
        """The writer creates the segment (`name=None`); reader `reader` attaches to `name`."""
        self.num_readers, self.slot_bytes, self.num_slots = num_readers, slot_bytes, num_slots
        self.reader = reader
        header = 8 * _HEADER_WORDS + num_readers * _ERROR_BYTES
        self._slots_at = header
        self._slot_size = 16 + slot_bytes
        size = header + num_slots * self._slot_size
        if 1 + 3 * num_readers > _HEADER_WORDS:
            raise ValueError(f"at most {(_HEADER_WORDS - 1) // 3} readers, got {num_readers}")
        self.shm = shared_memory.SharedMemory(name=name, create=name is None, size=size)
        if name is not None and multiprocessing.parent_process() is None:
            # The writer owns (and unlinks) the segment. A process that multiprocessing spawned
            # shares the writer's resource tracker; any other (a Ray actor) has its own, which
            # must not unlink the segment when this process exits.
            resource_tracker.unregister(self.shm._name, "shared_memory")  # type: ignore[attr-defined]
        buf = self.shm.buf
        self._words = np.ndarray((_HEADER_WORDS,), np.int64, buffer=buf)
        self._slot_words = [
            np.ndarray((2,), np.int64, buffer=buf, offset=header + i * self._slot_size)
            for i in range(num_slots)
        ]
        if name is None:
            self._words[:] = 0
            self._words[1 : 1 + num_readers] = -1  # no message read yet
            for w in self._slot_words:
                w[:] = -1
        self._seq = 0  # the writer's next sequence number / a reader's next expected one

    @property
    def name(self) -> str:
        return self.shm.name

    # -- reader states (start-up handshake and errors) -------------------------------------
    def set_state(self, reader: int, state: int, error: str = "") -> None:
        if error:
            data = error.encode()[: _ERROR_BYTES - 1]
            at = 8 * _HEADER_WORDS + reader * _ERROR_BYTES
            self.shm.buf[at : at + len(data)] = data
            self.shm.buf[at + len(data)] = 0
        self._words[1 + self.num_readers + reader] = state

    def state(self, reader: int) -> int:
        return int(self._words[1 + self.num_readers + reader])

    def error(self, reader: int) -> str:
        at = 8 * _HEADER_WORDS + reader * _ERROR_BYTES
        raw = bytes(self.shm.buf[at : at + _ERROR_BYTES])
        return raw.split(b"\0", 1)[0].decode(errors="replace")

    def idle_for(self, reader: int) -> float:
        """Seconds since a reader waiting for a message last showed it is alive; 0 while it
        runs one (the step's own timeouts bound that) or has not started waiting."""
        beat = int(self._words[1 + 2 * self.num_readers + reader])
        return max(0.0, time.monotonic() - beat / 1e3) if beat else 0.0

    def _beat(self, busy: bool = False) -> None:
        assert self.reader is not None
        beat = 0 if busy else int(time.monotonic() * 1e3)
        self._words[1 + 2 * self.num_readers + self.reader] = beat

    # -- writer ----------------------------------------------------------------------------
    def publish(self, obj: Any, timeout_s: float) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > self.slot_bytes:
            raise BroadcastTimeout(
                f"a step message of {len(data)} bytes exceeds the {self.slot_bytes}-byte slot"
            )
        seq, slot = self._seq, self._seq % self.num_slots
        oldest = seq - self.num_slots  # the message this slot held: every reader must have it
        if oldest >= 0:
            acks = self._words[1 : 1 + self.num_readers]
            deadline = time.monotonic() + timeout_s
            while int(acks.min()) < oldest:
                if time.monotonic() > deadline:
                    raise BroadcastTimeout(f"a worker has not read a step for {timeout_s:.0f}s")
                time.sleep(50e-6)
        at = self._slots_at + slot * self._slot_size + 16
        self.shm.buf[at : at + len(data)] = data
        words = self._slot_words[slot]
        words[1] = len(data)
        words[0] = seq
        self._seq = seq + 1

    def stop(self) -> None:
        self._words[0] = 1

    # -- reader ----------------------------------------------------------------------------
    def receive(self, writer_alive: Any, poll_s: float = 1.0) -> Any:
        """The next message, or None once the writer stopped or `writer_alive()` is False
        (asked every `poll_s` while idle). Spins briefly, then sleeps in growing steps."""
        seq, slot = self._seq, self._seq % self.num_slots
        words = self._slot_words[slot]
        self._beat()
        spins, sleep, next_check = 0, 20e-6, time.monotonic() + poll_s
        while int(words[0]) != seq:
            if self._words[0]:
                return None
            spins += 1
            if spins < 200:
                continue
            time.sleep(sleep)
            sleep = min(sleep * 2, 2e-3)
            if time.monotonic() > next_check:
                if not writer_alive():
                    return None
                self._beat()
                next_check = time.monotonic() + poll_s
        n = int(words[1])
        at = self._slots_at + slot * self._slot_size + 16
        obj = pickle.loads(self.shm.buf[at : at + n])
        assert self.reader is not None
        self._beat(busy=True)
        self._words[1 + self.reader] = seq
        self._seq = seq + 1
        return obj

    def close(self, unlink: bool = False) -> None:
        del self._words, self._slot_words
        self.shm.close()
        if unlink:
            self.shm.unlink()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
