"""`python -m harness.clusters up|status|kill|restart|down` (scripts/clusters.sh)."""

import sys

from harness.clusters.cli import main

sys.exit(main())
