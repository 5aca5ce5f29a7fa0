"""The client: the worker that holds the data and drives training, its per-topology step
runners, micro-batch pipelining, vertical alignment, rollback and prediction."""
