"""The layers recede adds or understands: bounded BN, BN subclasses with a tail, the corrected conv."""
