"""Training mechanics that do not depend on the architecture: the flow-matching objective, timesteps, optimizers,
lr schedules, EMA, compile, stop signals, metrics, validation loss and multi-stage rules."""
