"""The fold stage: BN folded into convs, and border corrections as a kept constant channel."""
