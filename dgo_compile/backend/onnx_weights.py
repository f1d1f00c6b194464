"""One weights file per artifact: every variant graph references the same ONNX external data.

A folded schedule gives several variant graphs that use the same weights. Exported one by one,
each file carries its own copy (3.4 GB per variant for SD-1.5 in fp32). Here each exported graph's
initializers are streamed, one tensor at a time, into a single `weights.bin`, deduplicated by
content (the exporter may give one weight different names in different graphs), and the graph is
rewritten to point at it with standard ONNX external-data entries: any onnxruntime can open a
variant on its own.

At run time `SharedWeights` maps the file once and hands each session the same buffers through
`SessionOptions.add_initializer`, so N sessions hold one copy (on CUDA, one device copy).
"""

from __future__ import annotations

import hashlib
import mmap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from dgo_compile.backend.precision import cast_weight
from dgo_compile.core.errors import DgoError

WEIGHTS_FILE = "weights.bin"
ALIGN = 64  # byte alignment of every tensor in the file: lets the runtime map tensors without copies
_NUMPY = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
          onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
          onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_, onnx.TensorProto.BFLOAT16: np.uint16}


class WeightsError(DgoError):
    """A graph's external data is missing, outside its folder, or does not match the weights file."""


@dataclass(frozen=True)
class WeightEntry:
    offset: int
    length: int


class SharedWeightsWriter:
    """Appends each distinct tensor once to `folder/weights.bin` and rewrites graphs to reference it."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / WEIGHTS_FILE
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._entries: dict[str, WeightEntry] = {}  # content hash -> where it is
        self.bytes_referenced = 0  # sum over graphs of the weight bytes they use (with repeats)

    def add(self, model: onnx.ModelProto, data_dir: Path, source_types: dict[str, int]) -> None:
        """Move `model`'s external initializers (read from `data_dir`) into the shared file, cast to the
        type the graph now declares (source_types: each initializer's type when it was exported)."""
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            raw = cast_weight(read_external(tensor, data_dir), source_types[tensor.name], tensor.data_type)
            entry = self._store(raw)
            self.bytes_referenced += entry.length
            _point_at(tensor, self.path.name, entry)

    def _store(self, raw: bytes) -> WeightEntry:
        key = hashlib.blake2b(raw, digest_size=20).hexdigest() + f":{len(raw)}"
        entry = self._entries.get(key)
        if entry is None:
            offset = self._file.tell()
            padding = -offset % ALIGN
            self._file.write(b"\0" * padding)
            entry = WeightEntry(offset + padding, len(raw))
            self._file.write(raw)
            self._entries[key] = entry
        return entry

    def close(self) -> int:
        """Flush and close; returns the file's size."""
        self._file.flush()
        self._file.close()
        return self.path.stat().st_size


def external_files(model: onnx.ModelProto) -> set[str]:
    """The locations every external initializer of `model` names."""
    return {_info(t)["location"] for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}


def read_external(tensor: onnx.TensorProto, data_dir: Path) -> bytes:
    info = _info(tensor)
    path = Path(data_dir) / info["location"]
    offset, length = int(info.get("offset", 0)), int(info["length"])
    with open(path, "rb") as f:
        f.seek(offset)
        raw = f.read(length)
    if len(raw) != length:
        raise WeightsError(f"{path} ends before tensor {tensor.name} ({length} bytes at {offset})")
    return raw


class SharedWeights:
    """The artifact's weights file mapped once; each graph's initializers as OrtValues over that map."""

    def __init__(self, path: Path, device: str = "cpu"):
        self.path = Path(path)
        self.device = device
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.path.stat().st_size else None
        self._values: dict[tuple[int, int, int, tuple[int, ...]], object] = {}  # one OrtValue per tensor

    def add_to(self, options, model: onnx.ModelProto) -> None:
        """Give `options` (onnxruntime.SessionOptions) this graph's external initializers from the shared map."""
        for tensor in model.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            options.add_initializer(tensor.name, self._value(tensor))

    def _value(self, tensor: onnx.TensorProto):
        import onnxruntime as ort

        info = _info(tensor)
        if info["location"] != self.path.name:
            raise WeightsError(f"initializer {tensor.name} points at {info['location']}, not {self.path.name}")
        offset, length = int(info.get("offset", 0)), int(info["length"])
        dtype, shape = _NUMPY.get(tensor.data_type), tuple(tensor.dims)
        if dtype is None:
            raise WeightsError(f"initializer {tensor.name} has ONNX type {tensor.data_type}, which the runner does not "
                               f"map")
        count = int(np.prod(shape, dtype=np.int64))
        if count * np.dtype(dtype).itemsize != length or self._map is None or offset + length > len(self._map):
            raise WeightsError(f"initializer {tensor.name} does not fit {self.path.name} ({length} bytes at {offset})")
        key = (offset, length, tensor.data_type, shape)
        if key not in self._values:
            array = np.frombuffer(self._map, dtype=dtype, count=count, offset=offset).reshape(shape)
            if self.device == "cpu":
                self._values[key] = ort.OrtValue.ortvalue_from_numpy(array)
            else:  # one device copy per tensor, shared by every session
                self._values[key] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)
        return self._values[key]


def _info(tensor: onnx.TensorProto) -> dict[str, str]:
    info = {entry.key: entry.value for entry in tensor.external_data}
    if "location" not in info or "length" not in info:
        raise WeightsError(f"initializer {tensor.name} has external data without a location and length")
    return info


def _point_at(tensor: onnx.TensorProto, location: str, entry: WeightEntry) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(entry.offset)), ("length", str(entry.length))):
        item = tensor.external_data.add()
        item.key, item.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL
