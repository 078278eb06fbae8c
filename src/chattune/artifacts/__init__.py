"""What a run leaves behind and hands on: the run report, the model card, the folder published to the hub."""
