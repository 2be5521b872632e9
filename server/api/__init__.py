"""The gRPC API: servicers that validate requests, call the store and convert its answers."""
