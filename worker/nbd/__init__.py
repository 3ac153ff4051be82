"""Everything that touches nbd-server: snippets, links, the main process, probes."""
