"""What a network observer sees: no raw activation bytes when encrypted (all of them when not)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from workers.client.worker import ClientWorker
from workers.server.worker import ServerWorker
from workers.tools.localdeploy import free_port

from .conftest import load_client, load_server


class Tap:
    """A loopback TCP forwarder that records every byte the client sends."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.captured = bytearray()
        self.port = free_port()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if record:
                    self.captured += data
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(
            self._pipe(reader, up_writer, True), self._pipe(up_reader, writer, False)
        )

    async def start(self) -> asyncio.Server:
        return await asyncio.start_server(self._handle, "127.0.0.1", self.port)


async def capture_run(files: dict[str, Path], insecure: bool) -> tuple[bytes, list[torch.Tensor]]:
    flag = ["server.insecure=true"] if insecure else []
    server_cfg = load_server(files["server"], *flag)
    port = int(server_cfg.server.bind.rsplit(":", 1)[1])
    tap = Tap(port)
    proxy = await tap.start()
    overrides = [f'client.server="tcp://127.0.0.1:{tap.port}"'] + (
        ["client.insecure=true"] if insecure else []
    )
    client = ClientWorker(
        load_client(files["client-1"], *overrides), files["client-1"].parent, progress=False
    )
    sent: list[torch.Tensor] = []
    client.bottom.register_forward_hook(lambda m, i, o: sent.append(o.detach().clone()))
    server = ServerWorker(server_cfg, files["server"].parent)
    stop = asyncio.Event()
    task = asyncio.create_task(server.serve(stop))
    try:
        await asyncio.wait_for(client.run(), 60)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        proxy.close()
    return bytes(tap.captured), sent


def leaked_windows(captured: bytes, tensors: list[torch.Tensor]) -> int:
    hits = 0
    for t in tensors[:20]:
        raw = t.contiguous().numpy().tobytes()
        for start in range(0, min(len(raw), 2048), 256):
            window = raw[start : start + 32]
            # ReLU zeros match ZMTP's zero padding: only distinctive windows count
            if len(set(window)) > 8 and window in captured:
                hits += 1
    return hits


@pytest.mark.parametrize("insecure", [False, True])
async def test_activations_are_unreadable_on_the_wire_only_when_encrypted(
    deployment, insecure: bool
) -> None:  # type: ignore[no-untyped-def]
    files = deployment(dataset="breast_cancer", epochs=1)
    captured, sent = await capture_run(files, insecure)
    assert len(captured) > 10_000 and sent
    hits = leaked_windows(captured, sent)
    if insecure:
        assert hits > 0  # the control: the same capture does find plaintext activations
    else:
        assert hits == 0
