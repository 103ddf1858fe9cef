"""Training: the loop, AdamW with decay groups and freeze-aware parameter lists, schedules, checkpoints, loggers."""
