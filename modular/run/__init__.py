"""A run: its config group, its folder (identity, lock, the files in it), the setup every command shares
(compose, data, device, model from a checkpoint), and the one checkpointer that saves and restores it.
"""
