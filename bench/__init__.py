"""The benchmark: drives the real stack (RabbitMQ, MariaDB, nbd-server, the worker as its
own process) and compares every result with a bare loop of the same shape (the floor).

Run it with `./scripts/bench.sh [--small] [--out DIR]`; see `bench/__main__.py`.
"""
