"""memstore: users, sessions and chat memory for AI agents, served over gRPC."""
