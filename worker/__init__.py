"""nbd-export-worker: prepares NBD exports of VM disks for migration jobs."""
