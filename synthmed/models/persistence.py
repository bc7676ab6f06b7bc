"""Model files: JSON settings and plain tensors, never pickle.

A model file is what ``torch.save`` writes for a dict of strings, numbers and tensors, read back
with ``torch.load(weights_only=True)``, which refuses any other object (so a crafted file cannot run
code). It holds a format tag and version, the model type, its JSON config and a SHA-256 checksum
of the config and every tensor, so corruption is caught before any weight is used.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from synthmed.errors import ModelFileError

if TYPE_CHECKING:
    from synthmed.models.base import Synthesizer

FILE_FORMAT = "synthmed-model"
FORMAT_VERSION = 1

# model_type -> module that defines it; imported on demand so loading one model needs only its code.
MODEL_MODULES = {
    "lstm": "synthmed.models.lstm",
    "cgan": "synthmed.models.cgan",
    "par": "synthmed.baselines.par",
    "gaussian-copula": "synthmed.baselines.gaussian_copula",
}


def tensor_checksum(config_json: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(config_json.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(
            tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        )
    return digest.hexdigest()


def save_model_file(
    path: str | Path, model_type: str, config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> Path:
    """Write a model file atomically: to a temporary name first, then renamed over ``path``."""
    path = Path(path)
    config_json = json.dumps(config, sort_keys=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    document = {
        "format": FILE_FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": model_type,
        "config": config_json,
        "tensors": tensors,
        "checksum": tensor_checksum(config_json, tensors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(document, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def read_model_file(path: str | Path) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check a model file; returns ``(model_type, config, tensors)``.

    Raises:
        ModelFileError: the file is missing, not a synthmed model, of a newer format, carries
            anything but plain data, or its checksum does not match its content.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no model file at {str(path)!r}")
    try:
        document = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelFileError(
            f"{str(path)!r} holds objects other than plain tensors and settings; refusing to "
            f"load it ({str(exc).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelFileError(
            f"{str(path)!r} is not a readable synthmed model file (corrupted or truncated?): {exc}"
        ) from None
    if not isinstance(document, dict) or document.get("format") != FILE_FORMAT:
        raise ModelFileError(f"{str(path)!r} is not a synthmed model file")
    version = document.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"{str(path)!r} has model-file format version {version!r}, newer than this synthmed "
            f"reads ({FORMAT_VERSION}); upgrade synthmed"
        )
    config_json, tensors = document.get("config"), document.get("tensors")
    if not isinstance(config_json, str) or not isinstance(tensors, dict):
        raise ModelFileError(f"{str(path)!r} lacks its config or tensors")
    if tensor_checksum(config_json, tensors) != document.get("checksum"):
        raise ModelFileError(
            f"{str(path)!r} is corrupted: its checksum does not match its settings and tensors"
        )
    return str(document.get("model_type")), json.loads(config_json), tensors


def load_synthesizer(path: str | Path, device: str | None = None) -> Synthesizer:
    """Load any synthesizer saved with ``save``; ``device`` overrides the saved device setting."""
    from synthmed.models.base import Synthesizer

    model_type, config, tensors = read_model_file(path)
    if model_type in MODEL_MODULES:
        importlib.import_module(MODEL_MODULES[model_type])
    cls = Synthesizer.registry().get(model_type)
    if cls is None:
        raise ModelFileError(
            f"{str(path)!r} holds a model of unknown type {model_type!r}; known types: "
            f"{sorted(MODEL_MODULES)}"
        )
    return cls._from_saved(config, tensors, device=device, source=str(path))
