"""placeholder"""

import os

import torch


def triton_unavailable(device) -> str | None:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return "triton is not installed (pip install triton)"
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton runs on CUDA, or on CPU only under TRITON_INTERPRET=1"
    return None
