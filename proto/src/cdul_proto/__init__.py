"""Generated Python code of the cdul.v1 gRPC API; regenerate with `make proto`."""
