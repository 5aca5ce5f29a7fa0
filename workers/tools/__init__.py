"""Tools around the workers: local deployment, provisioning, the demo, the central
baseline, the privacy audit and tune, and the config reference generator."""
