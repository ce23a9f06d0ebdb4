"""Owns devices and tensors: KV cache, input building, the forward pass and sampling."""
