"""Streaming access to Hugging Face safetensors folders.

The reader opens each ``*.safetensors`` file once and reads one tensor at a time (shapes and
dtypes come from the file headers, without reading data). The writer streams each tensor's
bytes to disk as it arrives (shards of at most ``max_shard_bytes``), so its memory is one
tensor, never a shard or the model.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from megatron_midtrain.errors import UserError

#: Files copied along with the weights when present (tokenizer + generation settings).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja",
)

_ST_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
}


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """(tensor entries, byte offset of the data section) of a safetensors file."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError("file too short")
        size = int.from_bytes(head, "little")
        if size > 100 * 2**20:
            raise ValueError(f"implausible header size {size}")
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


class HFReader:
    """Lazy view of the tensors in a HF model folder.

    Tensors are read with plain file reads into a fresh buffer (no mmap): the process then
    holds exactly the tensors it is converting, and its resident memory says so (mapped file
    pages would count in RSS for as long as the file stays open).
    """

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as fh:
                weight_map = json.load(fh).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
            weight_map = None
        if not files:
            bins = [f for f in os.listdir(hf_dir) if f.endswith((".bin", ".pt", ".pth"))]
            raise UserError(
                f"{hf_dir} holds no *.safetensors weights" + (f" (found {', '.join(bins)})" if bins else ""),
                "save the model with safetensors, e.g. model.save_pretrained(dir, safe_serialization=True)",
            )
        self._entries: dict[str, tuple[str, dict, int]] = {}  # name -> (path, header entry, data start)
        for name in files:
            path = os.path.join(hf_dir, name)
            if not os.path.isfile(path):
                raise UserError(f"{hf_dir}: shard {name} listed in the index is missing", "download the complete model folder")
            try:
                header, start = read_safetensors_header(path)
            except (OSError, ValueError) as err:
                raise UserError(f"cannot read {path}: {err}", "re-download the file (it is truncated or not safetensors)") from None
            size = os.path.getsize(path)
            for key, entry in header.items():
                if entry["dtype"] not in _ST_DTYPES or start + entry["data_offsets"][1] > size:
                    raise UserError(f"{path}: tensor {key} is truncated or has an unsupported dtype {entry['dtype']}",
                                    "re-download the file")
                self._entries[key] = (path, entry, start)
        if weight_map is not None:
            missing = sorted(k for k in weight_map if k not in self._entries)
            if missing:
                raise UserError(f"{hf_dir}: {len(missing)} tensors of the index are not in its shards (e.g. {missing[0]})",
                                "download the complete model folder")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def dtype(self, name: str) -> torch.dtype | None:
        return _ST_DTYPES.get(self._entries[name][1]["dtype"])

    def get(self, name: str) -> torch.Tensor:
        path, entry, start = self._entries[name]
        lo, hi = entry["data_offsets"]
        buf = torch.empty(hi - lo, dtype=torch.uint8)
        with open(path, "rb") as fh:
            fh.seek(start + lo)
            if fh.readinto(buf.numpy()) != hi - lo:
                raise UserError(f"{path}: tensor {name} is truncated", "re-download the file")
        return buf.view(_ST_DTYPES[entry["dtype"]]).reshape(entry["shape"])


_DTYPE_CODES = {v: k for k, v in _ST_DTYPES.items()}


class ShardedSafetensorsWriter:
    """Write ``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` + index, streaming.

    Each tensor's bytes go straight to a temporary data file; only names, dtypes and shapes
    are kept. When a shard is full its safetensors file is assembled (8-byte header length,
    JSON header, then the data copied over in blocks), so memory holds one tensor at a time,
    never a shard.
    """

    def __init__(self, out_dir: str, max_shard_bytes: int = 2 * 2**30):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._entries: list[tuple[str, str, list[int], int, int]] = []  # name, dtype, shape, start, end
        self._data = None
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def _data_path(self) -> str:
        return os.path.join(self.out_dir, f"shard-{len(self._shards):05d}.data.tmp")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().contiguous()
        size = tensor.numel() * tensor.element_size()
        offset = self._entries[-1][4] if self._entries else 0
        if self._entries and offset + size > self.max_shard_bytes:
            self._flush()
            offset = 0
        if self._data is None:
            self._data = open(self._data_path(), "wb")
        if tensor.dtype not in _DTYPE_CODES:
            raise ValueError(f"cannot write {name}: dtype {tensor.dtype} is not supported here")
        tensor.reshape(-1).view(torch.uint8).numpy().tofile(self._data)
        self._entries.append((name, _DTYPE_CODES[tensor.dtype], list(tensor.shape), offset, offset + size))
        self.total_bytes += size

    def _flush(self) -> None:
        header = {name: {"dtype": dt, "shape": shape, "data_offsets": [a, b]} for name, dt, shape, a, b in self._entries}
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep the tensor data 8-byte aligned
        tmp = f"shard-{len(self._shards):05d}.tmp"
        data_path = self._data_path()
        if self._data is not None:
            self._data.close()
            self._data = None
        else:
            open(data_path, "wb").close()
        with open(os.path.join(self.out_dir, tmp), "wb") as out, open(data_path, "rb") as data:
            out.write(len(blob).to_bytes(8, "little"))
            out.write(blob)
            shutil.copyfileobj(data, out, 64 * 2**20)
        os.remove(data_path)
        self._shards.append((tmp, [e[0] for e in self._entries]))
        self._entries = []

    def close(self) -> list[str]:
        if self._entries or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(os.path.join(self.out_dir, self._shards[0][0]), os.path.join(self.out_dir, "model.safetensors"))
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (tmp, tensors) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, tmp), os.path.join(self.out_dir, final))
            weight_map.update({t: final for t in tensors})
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as fh:
            json.dump(index, fh, indent=2)
        return names


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES + ("generation_config.json",):
        path = os.path.join(src_dir, name)
        if os.path.isfile(path):
            os.makedirs(dst_dir, exist_ok=True)
            shutil.copy2(path, os.path.join(dst_dir, name))
            copied.append(name)
    return copied
