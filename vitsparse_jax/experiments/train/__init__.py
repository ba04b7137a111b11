"""Training the built-in small models on the digits with optax (`run`)."""
