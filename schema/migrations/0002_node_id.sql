-- 0002: several appliances (nodes) share one database. Every mapping belongs to the node
-- whose nbd-server serves it, and the uniqueness rules hold per node: one mapping per
-- (node, vm, disk), one export name and one active mapping per device on each node.
-- `migrate` sets @node_id to the EXPORT_WORKER_NODE_ID of the node that runs it: rows from
-- the single-node schema belong to that appliance.
ALTER TABLE vm_export_mappings
    ADD COLUMN IF NOT EXISTS node_id VARCHAR(64) CHARACTER SET ascii NOT NULL DEFAULT ''
    AFTER id;

UPDATE vm_export_mappings SET node_id = @node_id WHERE node_id = '';

ALTER TABLE vm_export_mappings
    DROP INDEX IF EXISTS uq_vm_disk,
    DROP INDEX IF EXISTS uq_export_name,
    DROP INDEX IF EXISTS uq_active_device_id,
    ADD UNIQUE KEY IF NOT EXISTS uq_node_vm_disk (node_id, vm_id, disk_unit_number),
    ADD UNIQUE KEY IF NOT EXISTS uq_node_export_name (node_id, export_name),
    ADD UNIQUE KEY IF NOT EXISTS uq_node_active_device_id (node_id, active_device_id);
