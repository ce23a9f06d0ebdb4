"""Engine front end: tokenizer, detokenizer and request processing."""
