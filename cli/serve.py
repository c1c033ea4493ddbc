"""`offload serve`: an OpenAI-compatible HTTP server over one loaded model.

What it is: the command line around ``offload.server.create_app``: it binds HOST:PORT (127.0.0.1
by default; refused in one line when taken), loads the model once with a machine profile (as
``chat``), prints one dim line on stderr naming the model, profile and URL, and runs uvicorn
until Ctrl+C or SIGTERM, which stop accepting, end the open requests (a few seconds at most) and
exit 0. What it is not: the API itself (offload/server.py) or a multi-model router.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Optional

import typer

from cli.common import (
    ATTN_BITS_OPTION,
    BATCH_SIZE_OPTION,
    CONTEXT_OPTION,
    CPU_EXPERTS_OPTION,
    DEVICE_OPTION,
    DTYPE_OPTION,
    EXPERT_BITS_OPTION,
    EXPERT_FORMAT_OPTION,
    EXPERTS_PER_LAYER_OPTION,
    KV_BITS_OPTION,
    POLICY_OPTION,
    PREFETCH_DEPTH_OPTION,
    PROFILE_OPTION,
    QUIET_OPTION,
    RAM_OPTION,
    THREADS_OPTION,
    VRAM_OPTION,
    load_with_profile,
    model_label,
    stderr,
    user_errors,
)
from offload.demo import DEMO_MODEL_DIR
from offload.errors import OffloadError

GRACE_SECONDS = 3  # how long open requests may run on after Ctrl+C / SIGTERM


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; an OffloadError in one line when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OffloadError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise OffloadError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve_command(
    model: Optional[Path] = typer.Argument(
        None, help="A Hugging Face Mixtral checkpoint directory (safetensors), pack or hub id. Default: the "
        "bundled demo model."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port to listen on."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="OFFLOAD_API_KEY",
        help="Require Authorization: Bearer KEY on /v1 and /metrics (env OFFLOAD_API_KEY).",
    ),
    cors: Optional[str] = typer.Option(None, "--cors", help="Allow this origin (or *) cross-origin; none without it."),
    model_name: Optional[str] = typer.Option(
        None, "--name", help="The model's id in the API (default: the model directory's name)."
    ),
    queue_size: int = typer.Option(8, "--queue-size", min=0, hidden=True,
                                   help="Requests that may wait while one generates."),
    dtype: Optional[str] = DTYPE_OPTION,
    device: str = DEVICE_OPTION,
    context: Optional[int] = CONTEXT_OPTION,
    vram: Optional[str] = VRAM_OPTION,
    ram: Optional[str] = RAM_OPTION,
    experts_per_layer: Optional[int] = EXPERTS_PER_LAYER_OPTION,
    policy: str = POLICY_OPTION,
    prefetch_depth: Optional[int] = PREFETCH_DEPTH_OPTION,
    cpu_experts: Optional[str] = CPU_EXPERTS_OPTION,
    expert_format: Optional[str] = EXPERT_FORMAT_OPTION,
    expert_bits: Optional[int] = EXPERT_BITS_OPTION,
    attn_bits: Optional[int] = ATTN_BITS_OPTION,
    kv_bits: Optional[int] = KV_BITS_OPTION,
    batch_size: Optional[int] = BATCH_SIZE_OPTION,
    profile: Optional[str] = PROFILE_OPTION,
    quiet: bool = QUIET_OPTION,  # -q and -t act through their callbacks (cli.common.invocation)
    threads: Optional[int] = THREADS_OPTION,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models)."""
    with user_errors():
        import uvicorn

        from offload.server import create_app

        if api_key is not None and not api_key.strip():
            raise OffloadError("--api-key must not be empty")
        sock = bind(host, port)
        model = model or DEMO_MODEL_DIR
        try:
            engine, chosen = load_with_profile(
                profile, model, device=device, dtype=dtype, context_length=context, vram=vram, ram=ram,
                experts_per_layer=experts_per_layer, policy=policy, prefetch_depth=prefetch_depth,
                cpu_experts=cpu_experts, expert_format=expert_format, expert_bits=expert_bits, attn_bits=attn_bits,
                kv_bits=kv_bits, batch_size=batch_size,
            )
        except BaseException:
            sock.close()  # a load that fails leaves the port free at once
            raise
        name = model_name or model_label(model)
        app = create_app(engine, name, api_key=api_key, cors=cors, queue_size=queue_size)
        shown = f"[{host}]" if ":" in host else host
        bound = sock.getsockname()[1]
        stderr.print(f"serving {name} (profile {chosen.label}) at "
                     f"http://{shown}:{bound}/v1", style="dim", markup=False)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=GRACE_SECONDS,
                                lifespan="on")
        server = _Server(config)
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()
            engine.close()


def _Server(config):
    """uvicorn's server, ending with exit status 0 on Ctrl+C / SIGTERM: uvicorn re-raises the
    signal after its graceful shutdown, which would end the process by the signal."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if self.should_exit:
                self.force_exit = True  # a second Ctrl+C: stop waiting for open requests
            self.should_exit = True

    return Server(config)
