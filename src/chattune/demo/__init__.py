"""Assets chattune builds itself, offline: task data sets, tokenizers and tiny models."""
