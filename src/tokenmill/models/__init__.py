"""Model implementations (our own code, HF parameter names) and the architecture registry."""
