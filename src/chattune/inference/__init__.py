"""The inference layer: replies from a model (batched generation, stop at the end of turn), chat sessions,
and the batching engine behind `chattune serve` (engine, its per-row decoding and its cache joins)."""
