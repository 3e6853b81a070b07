"""Where models run: the `--device` / `--dtype` strings as torch objects, and clocks that are
right on asynchronous devices.

`clock` waits for the device's queued work first (`sync`), so every timed span in specdec
(`GenerationStats`, `specdec profile`, the bench, the demo) ends when its work has; on CUDA a
forward returns before the device has run it. On the CPU both are plain `time.perf_counter`.

Boundary: core level, torch and the standard library only. The CLI turns strings into objects
with `parse_device` / `parse_dtype` (declared with `device_field` / `dtype_field`); everything
below it takes `torch.device` / `torch.dtype`.
"""

from __future__ import annotations

import time
from dataclasses import field

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}  # fmt: skip


def sync(device: torch.device | str) -> None:
    """Wait until `device` has run everything queued on it; a no-op on the CPU (and on "meta",
    which runs nothing)."""
    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    else:  # mps, xpu, ...: their modules synchronise the current device
        getattr(torch, device.type).synchronize()


def clock(device: torch.device | str) -> float:
    """`time.perf_counter()` once `device` is idle: the one clock specdec times device work with."""
    sync(device)
    return time.perf_counter()


def parse_device(text: str, option: str = "--device") -> torch.device:
    """"cpu", "cuda" or "cuda:N" as a `torch.device`, refused with a one-line reason (naming
    `option`) when it is not a device, not supported, or not available on this machine."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option} {text!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"{option} {text}: specdec runs on cpu or cuda[:N], not on {device.type}")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"{option} {text}: CUDA is not available ({why}; torch {torch.__version__}); use {option} cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{option} {text}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1})")
    return device


def parse_dtype(text: str, option: str = "--dtype") -> torch.dtype:
    """A dtype name (float32, bfloat16, float16, float64 or fp32, bf16, fp16, fp64) as a `torch.dtype`."""
    if text not in DTYPES:
        raise ValueError(f"{option} {text!r}: choose one of float32, bfloat16, float16, float64 (or fp32, bf16, fp16, "
                         "fp64)")
    return DTYPES[text]


def device_field():
    """A config dataclass's `device` option (a string until `parse_device`)."""
    return field(default="cpu", metadata={"help": "where the models run: cpu, cuda or cuda:N"})


def dtype_field():
    """A config dataclass's `dtype` option (a string until `parse_dtype`)."""
    return field(default="float32", metadata={
        "help": "the models' dtype: float32, bfloat16, float16 or float64 (packed CPU linears need float32)"})
