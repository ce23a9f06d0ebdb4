"""What the engine builds once at start-up: the tokenizer, the runner (with the
tensor-parallel ranks, if any), and the KV cache's description for the start-up log."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenmill.config import EngineConfig
from tokenmill.engine.runner_setup import make_runner
from tokenmill.engine.tokenizer import Tokenizer
from tokenmill.loader.model_loader import LoadedModel
from tokenmill.worker.model_runner import ModelRunner

if TYPE_CHECKING:
    from tokenmill.engine.tp_executor import TPExecutor


def load_tokenizer(loaded: LoadedModel) -> Tokenizer:
    """The tokenizer the loader points at: a named one, else the GGUF file's own vocabulary."""
    if loaded.tokenizer_path is not None:
        return Tokenizer.from_pretrained(loaded.tokenizer_path)
    assert loaded.gguf is not None
    return Tokenizer.from_gguf(loaded.gguf)


def start_runner(
    config: EngineConfig, loaded: LoadedModel
) -> tuple[ModelRunner, TPExecutor | None]:
    """The engine's runner, with the executor of ranks 1..N-1 under tensor parallelism."""
    if config.tensor_parallel_size > 1:
        return start_tensor_parallel(config, loaded)
    return make_runner(config, loaded), None


def start_tensor_parallel(
    config: EngineConfig, loaded: LoadedModel
) -> tuple[ModelRunner, TPExecutor]:
    """Starts ranks 1..N-1 and builds this process's runner as rank 0."""
    from tokenmill.engine.tp_executor import TPExecutor
    from tokenmill.engine.tp_worker import STEP_TIMEOUT_S
    from tokenmill.worker.tp_runner import TPDriverRunner

    executor = TPExecutor(config, loaded.model_config, loaded.max_model_len)
    try:
        runner = make_runner(config, loaded, cls=TPDriverRunner, tp=executor.tp)
    except BaseException as e:
        error = executor.startup_error(e)
        executor.shutdown()
        if isinstance(e, ValueError):
            raise  # the model cannot be split: rank 0 says why as clearly as any rank
        raise error from e
    assert isinstance(runner, TPDriverRunner)
    runner.attach(executor.channel, STEP_TIMEOUT_S, executor.health_error)
    return runner, executor


def kv_cache_summary(runner: ModelRunner) -> str:
    """The KV cache's groups, e.g. "30 layers x 512 blocks" (plus each group's window)."""
    return ", ".join(
        f"{len(layout.layers)} layers x {spec.num_blocks} blocks"
        + ("" if spec.sliding_window is None else f" (window {spec.sliding_window})")
        for layout, spec in zip(runner.kv_layout, runner.kv_groups, strict=True)
    )
