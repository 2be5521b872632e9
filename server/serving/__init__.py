"""The serving process: server factory, interceptors, auth, observability, health, TLS, workers."""
