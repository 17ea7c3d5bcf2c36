"""fahr_client: the hospital side of a fahr federation (Flower ClientApp and the `fahr-client` CLI)."""
