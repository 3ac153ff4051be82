"""`python -m bench [--small] [--out DIR]`: runs every section and prints the table."""

from bench.run import main

raise SystemExit(main())
