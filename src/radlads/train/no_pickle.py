"""Loading a DCP checkpoint without running what a pickle in it asks for.

DCP stores its index (`.metadata`) as a pickle, and non-tensor state (the optimizer's settings) as
torch.save bytes that its default planner reads with `weights_only=False`. A checkpoint folder is a
user path like any other: here the index is read by an unpickler that builds only DCP's own
metadata classes, and the bytes only once `torch.load(weights_only=True)` accepts them.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

_ALLOWED = {
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module == "torch.distributed.checkpoint.metadata" or dtype or name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise ValueError(
            f"a checkpoint's .metadata asks for {module}.{name}, which no radlads checkpoint holds; "
            "it was not written by radlads: delete it or restore the run's own copy"
        )


class SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path} is not a checkpoint index; delete the checkpoint folder")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def checked_reader(state_dir) -> SafeReader:
    """A reader of `state_dir` whose index was read once here: DCP would wrap a refusal in a
    CheckpointException that names every rank's failure, not the reason."""
    reader = SafeReader(state_dir)
    reader.read_metadata()
    return reader


class SafePlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        # Read once as weights only: it raises on anything but tensors and plain data. The
        # default reading that follows then builds only what that one accepted.
        torch.load(value, weights_only=True)
        value.seek(0)
        super().load_bytes(read_item, value)
