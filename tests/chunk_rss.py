"""Peak memory of a real client process whose server never finishes a big chunked reply.

``python -m tests.chunk_rss MIB`` (from the repository, after ``make install``): a server in
a thread answers the client's steps from step 2 on with replies carrying MIB more and sends
every part of each but the last; the client, ``sl-pipeline client`` under ``/usr/bin/time -v``
(``timeout_s = 5``, ``retry_for_s = 1``, the message limits raised to 2 GB), fills the
buffers of one such reply per try and gives up after 8 tries. Prints its exit status, time,
peak RSS and last line (docs/security.md, "A hostile server").
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from sl_pipeline.messages import Kind, Message
from sl_pipeline.zmtp_router import ZmtpRouter
from workers.runtime.peers import Peer
from workers.server.worker import ServerWorker
from workers.tools.localdeploy import init_deployment

from .test_hostile_chunks import padded
from .threadserver import ThreadServer

RAISED = ("limits.max_message_bytes=2000000000", "limits.max_tensor_bytes=2000000000")


class AllButLast(ServerWorker):
    """Replies to forwards from step 2 on carry ``pad_floats`` more and lack their last part."""

    pad_floats = 0

    async def _send(self, endpoint: ZmtpRouter, identity: bytes, peer: Peer, msg: Message) -> None:
        if msg.kind is not Kind.BACKWARD or msg.step < 2:
            return await super()._send(endpoint, identity, peer, msg)
        parts: list[Any] = list(peer.channel.parts(padded(msg, self.pad_floats)))
        await endpoint.send_parts(identity, parts[:-1])


def measure(mib: int) -> str:
    AllButLast.pad_floats = mib * 2**20 // 4
    out = Path(tempfile.mkdtemp()) / "deployment"
    made = init_deployment(out, clients=1, dataset="breast_cancer", epochs=1)
    files = {name: Path(path) for name, path in made["files"].items()}
    sets = ["client.timeout_s=5", "client.retry_for_s=1", *RAISED]
    client = [sys.executable, "-m", "workers", "client", "--config", str(files["client-1"])]
    command = ["/usr/bin/time", "-v", *client, "--no-progress"]
    command += [arg for s in sets for arg in ("--set", s)]
    with ThreadServer(files["server"], *RAISED, worker=AllButLast):
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    lines = done.stderr.splitlines()
    peak = next((line.split(":")[1].strip() for line in lines if "Maximum resident" in line), "?")
    last = next((line for line in reversed(lines) if line.startswith("sl-pipeline")), "")
    return f"{mib} MiB: exit {done.returncode}, peak RSS {peak} kB; {last[:160]}"


if __name__ == "__main__":
    print(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 256))
