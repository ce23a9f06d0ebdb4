"""Model building blocks: linear (with quant methods), norms, rotary embeddings, attention."""
