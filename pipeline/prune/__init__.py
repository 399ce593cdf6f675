"""The prune stage: rank channel groups, plan which to drop, remove them exactly, absorb their constants."""
