"""What every stage shares: atomic writes and output folders, integrity, numerics and tolerances, verification verdicts, timing, progress and processes."""
