"""Messages and service stubs of cdul.v1: `labeler_pb2` and `labeler_pb2_grpc`."""
