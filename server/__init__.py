"""fahr_server: the coordinating side of a fahr federation (Flower ServerApp and the `fahr-server` CLI)."""
