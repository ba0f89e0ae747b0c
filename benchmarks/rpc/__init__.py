"""rpc benchmarks: our gRPC layer vs grpcio, grpclib and bare TLS (``python -m benchmarks.rpc``).

Each peer runs as a server process and a client process over mutual TLS 1.3 on loopback with
the same proto (``bench.proto``, compiled at run time into a temporary directory). Results and
how to read them: docs/benchmarks.md.
"""
