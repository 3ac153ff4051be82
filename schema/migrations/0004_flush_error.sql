-- 0004: durability on demand. When fsync of an export's device fails, what was written
-- through it may be lost even though a later fsync succeeds (Linux reports a writeback
-- error once per open file). The mapping keeps the failure, so no later flush-export or
-- release-export of it claims durability it did not get, until a new prepare-export for the
-- (VM, disk) starts a new copy.
ALTER TABLE vm_export_mappings
    ADD COLUMN IF NOT EXISTS flush_error VARCHAR(255) NULL;
