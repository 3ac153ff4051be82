-- 0006: the live view of each export. A mapping remembers when its copy was prepared (a
-- create; a recreate or relink goes on with the same copy) and how many bytes the
-- scheduler plans to write (progress). export_usage keeps what the worker's samples of the
-- server's connections counted for the export's current copy, so that its totals survive a
-- worker restart and never go back: connections since prepared, bytes written and read
-- (all, and by connections that ended), the last I/O, the last event's sequence number,
-- and the connections open when it was kept (counted already; a restarted worker does not
-- count them again).
ALTER TABLE vm_export_mappings
    ADD COLUMN IF NOT EXISTS planned_bytes BIGINT UNSIGNED NULL,
    ADD COLUMN IF NOT EXISTS prepared_at TIMESTAMP(6) NULL;

CREATE TABLE IF NOT EXISTS export_usage (
    node_id VARCHAR(64) CHARACTER SET ascii NOT NULL,
    export_name VARCHAR(128) CHARACTER SET ascii NOT NULL,
    -- The mapping's prepared_at these counts belong to: another means a new copy.
    prepared_at TIMESTAMP(6) NOT NULL,
    connections_total BIGINT UNSIGNED NOT NULL DEFAULT 0,
    bytes_written BIGINT UNSIGNED NOT NULL DEFAULT 0,
    bytes_read BIGINT UNSIGNED NOT NULL DEFAULT 0,
    ended_written BIGINT UNSIGNED NOT NULL DEFAULT 0,
    ended_read BIGINT UNSIGNED NOT NULL DEFAULT 0,
    last_io_at TIMESTAMP(6) NULL,
    event_seq BIGINT UNSIGNED NOT NULL DEFAULT 0,
    -- JSON: [[pid, start ticks, bytes written, bytes read], ...]
    open_connections TEXT NOT NULL,
    updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    PRIMARY KEY (node_id, export_name)
) ENGINE = InnoDB DEFAULT CHARSET = ascii;
