"""Models: the zoo behind ``model.name`` and the save/rebuild format of (pruned) models."""
