"""DCP's reader and planner, made safe: loading a sharded checkpoint never executes code.

Stock ``torch.distributed.checkpoint`` unpickles ``.metadata`` with ``pickle.load``
(``FileSystemReader.read_metadata``) and reads every non-tensor value with
``torch.load(weights_only=False)`` (``DefaultLoadPlanner.load_bytes``): a crafted checkpoint runs
code on load. Here the metadata is unpickled with an allow-list of DCP's own metadata classes
(and torch sizes, dtypes, layouts, paths), and values load with ``weights_only=True``. A module of
its own because importing DCP takes seconds: :mod:`kktrain.dcp` imports it when a sharded
checkpoint is read.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``: only its own dataclasses, torch sizes/dtypes/layouts, paths."""

    def find_class(self, module: str, name: str) -> Any:
        """The allowed globals; anything else (``os.system``, ``exec`` ...) is refused."""
        if (module, name) in _ALLOWED_GLOBALS or module == _METADATA_MODULE:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a checkpoint's DCP metadata")


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is unpickled with :class:`MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's metadata, refused when it names anything but DCP's own classes."""
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError("a checkpoint's DCP metadata is not a Metadata object")
        storage = metadata.storage_meta if metadata.storage_meta is not None else StorageMeta()
        storage.load_id = self.load_id
        metadata.storage_meta = storage
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor values with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Tensors and plain containers only; anything else raises ``UnpicklingError``."""
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
