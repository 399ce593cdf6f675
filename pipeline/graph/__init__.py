"""The channel graph: which channels must go together, traced through any model, and what they cost."""
