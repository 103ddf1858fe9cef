"""Continual pretraining: stages that add, freeze and merge experts as new domains arrive.

`merge` holds the expert-merging math (shared with the dense export).
"""
