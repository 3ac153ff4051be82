"""The Mapping record: one row of vm_export_mappings, as the flow and the repository see it.

Kept apart from repository.py so the flow can use it without importing the database driver.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict


class Mapping(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    node_id: str
    vm_id: str
    disk_unit_number: int
    vm_name: str
    export_name: str
    device_path: str
    device_id: str
    status: Literal["active", "inactive"]
    created_at: datetime
    updated_at: datetime

    @property
    def is_active(self) -> bool:
        return self.status == "active"
