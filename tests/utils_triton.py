"""Running the Triton kernels' tests on a CPU, under Triton's interpreter.

Importing this module sets TRITON_INTERPRET=1 when there is no CUDA device; it must come before
any import of a kernel module, since kernels are interpreted only if the variable was set when
they were defined. `interpreted(module)` reloads a kernel module that something imported earlier
in the process without it; `run_after_late_env(script)` runs a check in a fresh interpreter
that imports triton before the variable is set (the kernels must cope with that).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from types import ModuleType

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


def interpreted(module: ModuleType) -> ModuleType:
    """`module` with its kernels interpreted (reloaded if needed); as is on a GPU."""
    if not CUDA and not module.interpreted():
        module = importlib.reload(module)
    return module


def run_after_late_env(script: str) -> subprocess.CompletedProcess:
    """Runs `script` with TRITON_INTERPRET unset in the environment (the script sets it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
