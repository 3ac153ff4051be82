"""Private clusters on one machine, all on 127.0.0.1: three RabbitMQ nodes (quorum queues)
and three MariaDB nodes replicating with Galera 4, with HAProxy from Debian in front of
the Galera nodes as the one database address the worker is given.

Every process is started here, on free ports, with its own directories, and stopped (or
killed) by its pid: nothing touches the machine's own RabbitMQ, MariaDB or epmd. A
cluster's state (ports, pids) is kept in `<root>/cluster.json`, so the command line
(`python -m harness.clusters up|status|kill|restart|down`, see scripts/clusters.sh) can
manage one across invocations, and `down` is idempotent.

The modules: `rabbitmq`, `galera`, `state` (ports, start-up bound, cluster.json, shared by
both) and `cli`; the processes by pid are harness/processes.py's.
"""

from harness.clusters.galera import GaleraCluster, GaleraNode, galera_cluster
from harness.clusters.rabbitmq import RabbitCluster, RabbitNode, amqp_answers, rabbit_cluster

__all__ = [
    "GaleraCluster",
    "GaleraNode",
    "RabbitCluster",
    "RabbitNode",
    "amqp_answers",
    "galera_cluster",
    "rabbit_cluster",
]
