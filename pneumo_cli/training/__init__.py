"""`pneumo train`: run folders, training and resuming, state and checkpoints, devices and
multi-worker clusters."""
