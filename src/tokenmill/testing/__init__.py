"""Tools that check tokenmill against reference implementations, shared by the test suite and the
benchmarks (`parity`: logits and greedy tokens against transformers; `gguf_files`: pieces of
random GGUF files). The engine never imports them."""
