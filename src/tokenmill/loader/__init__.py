"""Model weight and metadata loaders."""
