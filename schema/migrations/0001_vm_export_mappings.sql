-- 0001: which NBD export serves which disk of which VM, and on which device.
-- Keeps the original system's columns and names; adds the device's identity and the
-- one-active-mapping-per-device rule.
CREATE TABLE IF NOT EXISTS vm_export_mappings (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    vm_id CHAR(36) CHARACTER SET ascii NOT NULL,
    disk_unit_number SMALLINT UNSIGNED NOT NULL,
    vm_name VARCHAR(255) NOT NULL,
    export_name VARCHAR(128) CHARACTER SET ascii NOT NULL,
    device_path VARCHAR(1024) CHARACTER SET ascii NOT NULL,
    -- What the path named when the mapping was made: "blk:MAJOR:MINOR" (or "file:DEV:INODE"
    -- for development disks). /dev/vdb and its /dev/disk/by-id link share it.
    device_id VARCHAR(64) CHARACTER SET ascii NOT NULL,
    status ENUM('active', 'inactive') NOT NULL DEFAULT 'active',
    created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    -- NULL on inactive rows, and a UNIQUE index admits many NULLs: so no device is ever
    -- served by two active mappings, whatever process writes the rows or path names it.
    active_device_id VARCHAR(64) CHARACTER SET ascii
        AS (IF(status = 'active', device_id, NULL)) STORED,
    UNIQUE KEY uq_vm_disk (vm_id, disk_unit_number),
    UNIQUE KEY uq_export_name (export_name),
    UNIQUE KEY uq_active_device_id (active_device_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
