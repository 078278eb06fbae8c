"""The inference layer: replies from a model (batched generation, stop at the end of turn) and chat sessions."""
