"""Scoring whole models: a model against its base on the same tokens, with sample replies (for `chattune
eval` and the run report), and task scores."""
