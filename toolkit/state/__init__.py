"""What survives a crash: atomic file writes, step-file naming and pruning, training states for exact resume, and
full fine-tune transformer folders."""
