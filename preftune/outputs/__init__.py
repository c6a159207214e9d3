"""What a run leaves behind: the run folder, metrics, checkpoints and the final model."""
