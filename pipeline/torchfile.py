"""The one place ddpmseg reads files written by torch.save: checkpoints, resume files, classifier members.

Always ``torch.load(..., map_location="cpu", weights_only=True)``: only tensors and plain containers are
unpickled. A file holding anything else (a pickled class, a function: code that unpickling would run) is refused
with UnsafeTorchFileError naming the file and the globals it refers to; the check is never bypassed.
"""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import warnings
from typing import IO, Any

import torch

__all__ = ["TorchFileError", "UnsafeTorchFileError", "load_tensors"]


class TorchFileError(ValueError):
    """A file that torch.load(weights_only=True) cannot read (the message names it)."""


class UnsafeTorchFileError(TorchFileError):
    """A torch.save file that refers to code or Python objects besides tensors and plain containers."""


def _reason(err: BaseException) -> str:
    """torch's own reason without its advice (which suggests turning the safety check off)."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1]
    text = text.split("Check the documentation of torch.load", 1)[0].split(" Please use", 1)[0]
    if "Weights only load failed" in text:
        text = ""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())[:200]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _pickle_globals(data: bytes) -> list[str]:
    """The globals (module.name) a plain pickle refers to, read from its opcodes (nothing is executed); empty
    when `data` is not a pickle or refers to none."""
    names, strings = set(), []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name == "GLOBAL":
                names.add(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.add(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - not a (complete) pickle: what was read so far is all there is
        pass
    return sorted(names)


def _unsafe_globals(source: str | os.PathLike | IO[bytes]) -> list[str]:
    """The globals (module.name) the file refers to that weights_only does not allow: torch's own scan of a zip
    checkpoint, else the opcodes of a plain pickle."""
    try:
        if hasattr(source, "seek"):
            source.seek(0)
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(source))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: a legacy or plain pickle
        pass
    if hasattr(source, "seek"):
        source.seek(0)
        data = source.read()
    else:
        with open(source, "rb") as handle:
            data = handle.read()
    return _pickle_globals(data)


def load_tensors(source: str | os.PathLike | IO[bytes] | bytes, what: str) -> Any:
    """``torch.load(source, map_location="cpu", weights_only=True)``; `what` names the file in errors.

    Raises UnsafeTorchFileError when the file refers to code or objects (naming them), TorchFileError when it
    is no torch.save file or is truncated (naming it and torch's reason, without torch's advice to disable the
    check); a missing file is FileNotFoundError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        names = _unsafe_globals(source)
        if not names:
            raise TorchFileError(f"{what} is not a file written by torch.save, or is truncated ({_reason(err)})") \
                from None
        raise UnsafeTorchFileError(
            f"{what} contains code or Python objects besides tensors and plain containers (it refers to "
            f"{', '.join(names)}); it is refused for safety, because loading it could run code. Expected tensors "
            f"only, e.g. a state dict saved with torch.save(model.state_dict(), path)") from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for unreadable files
        raise TorchFileError(f"{what} is not a file written by torch.save, or is truncated ({_reason(err)})") \
            from None
