"""What the tests and the benchmark both start and drive: real services on loopback
(nbd-server, MariaDB, RabbitMQ and Galera clusters, a TCP proxy, the worker as a process),
the SQL and disks they use, and the checks a fault is judged by. Neither tests/ nor bench/
reaches into the other for these."""
