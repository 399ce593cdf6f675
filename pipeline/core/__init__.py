"""What every stage shares: atomic writes and output folders, integrity, numerics and
tolerances, verification verdicts, progress bars and process ranks."""
