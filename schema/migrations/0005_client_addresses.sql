-- 0005: access control. Who may connect to each export: the normalized addresses and CIDR
-- networks its authfile admits (comma-separated), so that a reuse compares them without
-- reading the file and reconciliation can rewrite a missing or wrong authfile. NULL on rows
-- from before: they admit the worker's default (EXPORT_WORKER_CLIENT_ADDRESSES).
ALTER TABLE vm_export_mappings
    ADD COLUMN IF NOT EXISTS client_addresses VARCHAR(1024) NULL;
