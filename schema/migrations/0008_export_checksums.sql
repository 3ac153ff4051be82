-- 0008: checksum-export jobs outlive their delivery. A checksum can take longer than the
-- broker's consumer timeout, so the job is recorded here and acked once its device is
-- flushed; the hash runs in the background and its reply is written here (`reply` not
-- NULL) and to export_jobs in one transaction, then published to the job's `reply_to`
-- with its `correlation_id`, and the row deleted. A restarted worker hashes again the rows
-- of its node still without a reply and publishes those with one: every job is answered,
-- and a redelivered one finds its row and is not run twice.
CREATE TABLE IF NOT EXISTS export_checksums (
    node_id VARCHAR(64) CHARACTER SET ascii NOT NULL,
    job_id VARCHAR(128) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    vm_id CHAR(36) CHARACTER SET ascii NOT NULL,
    disk_unit_number SMALLINT UNSIGNED NOT NULL,
    -- What was hashed: the export's link must still open this device at the end.
    device_path VARCHAR(1024) NOT NULL,
    device_id VARCHAR(128) CHARACTER SET ascii NOT NULL,
    algorithm VARCHAR(16) CHARACTER SET ascii NOT NULL,
    block_size INT UNSIGNED NOT NULL,
    reply_to VARCHAR(255) NULL,
    correlation_id VARCHAR(255) NULL,
    -- The reply (export-checksum or export-failed JSON) once hashed; NULL while running.
    reply TEXT NULL,
    created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (node_id, job_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
