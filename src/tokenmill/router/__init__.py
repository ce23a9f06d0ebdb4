"""A cache-aware router over OpenAI-compatible workers (`tokenmill router`), and data-parallel
replicas behind it (`tokenmill serve --data-parallel-size N`). No engine, no torch: the router
only reads request bodies and proxies them."""
