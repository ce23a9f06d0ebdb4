"""Speculative decoding: proposers of draft tokens (n-gram lookup, SuffixDecoding) and the
engine-side driver. Verification lives in sampling/rejection.py, scheduling in core/."""
