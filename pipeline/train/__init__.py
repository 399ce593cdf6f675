"""The train stage: polarised training (penalties, the budget controller, ISTA), resumable and distributed."""
