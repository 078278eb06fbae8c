"""The training layer: TRL's trainers composed with chattune's loss, evaluation, atomic checkpoints,
interrupts and length-grouped sampling; the config mapped onto their arguments; the run directory."""
