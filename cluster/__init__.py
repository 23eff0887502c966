"""Ray wiring: config, workers, the collect-and-infer driver and the CLI. Nothing imports this."""
