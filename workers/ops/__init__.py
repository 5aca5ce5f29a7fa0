"""Operations: the HTTP endpoint, Prometheus metrics and logging of a worker process."""
