"""The PAC network, inference policies, snapshots and the policy server (server.py needs grpc)."""
