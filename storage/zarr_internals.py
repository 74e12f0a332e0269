"""zarr's private API, in one place. zarr says `zarr.core` is private (zarr/core/__init__.py): it may change in any
release. Checked against zarr 3.1.6 (the pin is `zarr>=3.1.6,<3.2`; `SupportsSetSync` first appears in 3.1.6).
A new zarr that moves any of these fails here, at import, naming this module, instead of somewhere in the write path.

Used by the feature store's write path (storage/features.py): chunks encoded once and stored through the store's
sync API, the array's metadata document written last (the commit).
"""
from __future__ import annotations

from zarr.abc.store import SupportsSetSync
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.core.common import ZARR_JSON
from zarr.core.group import GroupMetadata
from zarr.core.metadata import ArrayV3Metadata
from zarr.core.sync import sync as zarr_sync

CHECKED_ZARR_VERSIONS = ">=3.1.6,<3.2"

__all__ = ["ArrayV3Metadata", "Buffer", "CHECKED_ZARR_VERSIONS", "GroupMetadata", "SupportsSetSync", "ZARR_JSON",
           "default_buffer_prototype", "zarr_sync"]
