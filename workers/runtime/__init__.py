"""What every worker process stands on: the router service, start-up, checkpoints,
bounded tables and the start-up diagnosis."""
