-- 0007: an export's life under the scheduler's control. `generation` grows with every
-- successful prepare-export of the (node, VM, disk): jobs that carry an older one are
-- refused (a late message from a scheduler that gave the export up). A lease: the export
-- expires at `lease_expires_at` (the database's clock, for every appliance alike) unless a
-- prepare-export, flush-export or inspect-export with renew renews it by `lease_s`; or
-- after `idle_timeout_s` without a connection or I/O. `fenced_at`: the export admits no new
-- connection (an empty authfile) while a drain or an expiry is under way; a new
-- prepare-export lifts it.
-- last_action gains room for the mark of a settled answer ("recreated+reused!").
ALTER TABLE vm_export_mappings
    MODIFY COLUMN last_action VARCHAR(24) CHARACTER SET ascii NULL,
    ADD COLUMN IF NOT EXISTS generation BIGINT UNSIGNED NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS lease_s INT UNSIGNED NULL,
    ADD COLUMN IF NOT EXISTS lease_expires_at TIMESTAMP(6) NULL,
    ADD COLUMN IF NOT EXISTS idle_timeout_s INT UNSIGNED NULL,
    ADD COLUMN IF NOT EXISTS fenced_at TIMESTAMP(6) NULL,
    ADD KEY IF NOT EXISTS ix_node_lease (node_id, status, lease_expires_at);

-- The lease events (expiring, expired, expiry_failed) go through this outbox: written
-- before the step they announce, made `ready` once it is done, published with confirms
-- and marked; a worker killed in between finds them at its next start. One row per
-- (export, kind, ref): a repeat is the same row, so the same body (at least once, alike).
CREATE TABLE IF NOT EXISTS export_events (
    node_id VARCHAR(64) CHARACTER SET ascii NOT NULL,
    export_name VARCHAR(128) CHARACTER SET ascii NOT NULL,
    kind VARCHAR(16) CHARACTER SET ascii NOT NULL,
    -- What the event is about: the generation (expired), with the deadline (expiring).
    ref VARCHAR(64) CHARACTER SET ascii NOT NULL,
    body TEXT NOT NULL,
    ready TINYINT(1) NOT NULL DEFAULT 0,
    published_at TIMESTAMP(6) NULL,
    created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (node_id, export_name, kind, ref),
    KEY ix_node_pending (node_id, published_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
