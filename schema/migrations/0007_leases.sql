-- 0007: an export's life under the scheduler's control. `generation` grows with every
-- successful prepare-export of the (node, VM, disk): jobs that carry an older one are
-- refused (a late message from a scheduler that gave the export up). A lease: the export
-- expires at `lease_expires_at` (the database's clock, for every appliance alike) unless a
-- prepare-export, flush-export or inspect-export with renew renews it by `lease_s`; or
-- after `idle_timeout_s` without a connection or I/O. `fenced_at`: the export admits no new
-- connection (an empty authfile) while a drain or an expiry is under way; a new
-- prepare-export lifts it. `expiry_notice_at`: when the `expiring` event was published for
-- the current deadline (at most one per deadline).
ALTER TABLE vm_export_mappings
    ADD COLUMN IF NOT EXISTS generation BIGINT UNSIGNED NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS lease_s INT UNSIGNED NULL,
    ADD COLUMN IF NOT EXISTS lease_expires_at TIMESTAMP(6) NULL,
    ADD COLUMN IF NOT EXISTS idle_timeout_s INT UNSIGNED NULL,
    ADD COLUMN IF NOT EXISTS fenced_at TIMESTAMP(6) NULL,
    ADD COLUMN IF NOT EXISTS expiry_notice_at TIMESTAMP(6) NULL,
    ADD KEY IF NOT EXISTS ix_node_lease (node_id, status, lease_expires_at);
