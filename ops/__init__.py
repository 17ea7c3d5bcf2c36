"""fahr_ops: what both federation sides and the researcher CLI share, without importing Flower:
process groups, launching Flower's executables, certificates, the CLI factory."""
