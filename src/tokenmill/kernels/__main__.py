"""`python -m tokenmill.kernels`: builds every C++ extension now (see kernels.build)."""

from __future__ import annotations

import logging

from tokenmill.kernels.build import build_all

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
build_all()
