"""HTTP handlers, one module per plane; each exposes ``register(api)``."""
