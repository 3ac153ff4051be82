-- 0003: at-least-once delivery made idempotent. Every job the worker answers is recorded
-- by (node, job_id) with its reply, so a redelivered or duplicated job is answered from
-- the record and never changes anything twice. The mapping also remembers the job that
-- last changed it and what that job did: written by the same statement as the change, it
-- lets a job redelivered after a crash (claimed, not yet recorded) finish and answer as
-- its first delivery would have.
ALTER TABLE vm_export_mappings
    ADD COLUMN IF NOT EXISTS last_job_id VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NULL,
    ADD COLUMN IF NOT EXISTS last_action VARCHAR(16) CHARACTER SET ascii NULL;

CREATE TABLE IF NOT EXISTS export_jobs (
    node_id VARCHAR(64) CHARACTER SET ascii NOT NULL,
    -- Job ids are case-sensitive: "Job-1" and "job-1" are two jobs.
    job_id VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    vm_id CHAR(36) CHARACTER SET ascii NOT NULL,
    disk_unit_number SMALLINT UNSIGNED NOT NULL,
    -- The reply as published (export-ready or export-released JSON).
    reply TEXT NOT NULL,
    created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (node_id, job_id),
    -- Housekeeping deletes this node's records older than the retention period.
    KEY ix_node_created_at (node_id, created_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
