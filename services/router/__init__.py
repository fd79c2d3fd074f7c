"""Router: the client API (gRPC), request table, backend picking and token relay."""
