"""How the runner's notebook kernels talk to it: an encrypted or local transport, so the console stays quiet.

A kernel started by papermill (through nbclient and jupyter_client) listens on TCP sockets by default, and ipykernel
then logs "Kernel is running over TCP without encryption" to the kernel process's stderr, which is the runner's
console, once per run. Rather than filtering that line, the runner removes its cause: where pyzmq has CurveZMQ,
jupyter_client can provision keys (its ``transport_encryption`` setting) and the kernelspec declares ``curve``
support (ipykernel's own spec does), the kernel manager gives the kernel a key pair and every message is encrypted;
elsewhere on POSIX the kernel uses IPC sockets (files in Jupyter's private runtime folder) instead of TCP. Either way
ipykernel has nothing to warn about, and whatever else the kernel process prints to stderr (a real error, a crash
message) still reaches the console.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from traitlets.config import Config


def curve_available(kernel_name: str = "python3") -> bool:
    """Whether the kernel can be given CurveZMQ keys.

    Args:
        kernel_name: the kernelspec papermill starts.

    Returns:
        True when pyzmq is built with CurveZMQ, jupyter_client has the ``transport_encryption`` setting and the
        kernelspec lists ``curve`` in ``metadata.supported_encryption``.
    """
    import zmq
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    from jupyter_client.manager import KernelManager

    if not zmq.has("curve") or "transport_encryption" not in KernelManager.class_traits():
        return False
    try:
        supported = KernelSpecManager().get_kernel_spec(kernel_name).metadata.get("supported_encryption") or []
    except NoSuchKernel:
        return False  # papermill names the missing kernel itself
    return "curve" in ([supported] if isinstance(supported, str) else supported)


def kernel_config(kernel_name: str = "python3") -> Config:
    """The traitlets config for papermill's ``config=``: how the kernel manager connects to the kernel.

    Args:
        kernel_name: the kernelspec papermill starts.

    Returns:
        ``KernelManager.transport_encryption = "required"`` where :func:`curve_available`; else
        ``KernelManager.transport = "ipc"`` with a fresh socket prefix on POSIX; else an empty config (TCP, and
        ipykernel's notice).
    """
    c = Config()
    if curve_available(kernel_name):
        c.KernelManager.transport_encryption = "required"  # checked above: a failure here is a real error
    elif os.name == "posix":
        from jupyter_core.paths import jupyter_runtime_dir

        # An absolute socket prefix, one per kernel: jupyter_client's default ("kernel-ipc") is relative, and the
        # kernel starts in the repository root while the runner may sit elsewhere (the two would not meet); a shared
        # prefix would let parallel runs (-j) pick the same socket numbers. The runtime folder is private (0700).
        runtime = Path(jupyter_runtime_dir())
        runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        c.KernelManager.transport = "ipc"
        c.KernelManager.ip = str(runtime / f"blip2-{uuid.uuid4().hex[:12]}-ipc")  # sockets: <ip>-1 … <ip>-5
    return c
