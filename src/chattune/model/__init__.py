"""The model layer: loading (hub ids, local and adapter directories; safetensors only), LoRA adapters,
the selective LM head (loss without full-vocabulary logits), training speed-ups and memory estimates."""
