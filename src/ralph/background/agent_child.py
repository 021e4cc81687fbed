"""The agent process itself (`python -m ralph.background.agent_child`), started by a server
in the `subprocess` worker mode: see `ralph.background.agent_process` for the protocol.

It lives no longer than its server: on Linux the kernel kills it when the server dies
(`PR_SET_PDEATHSIG`), even while it is still importing or opening its database; elsewhere it
notices when its stdin ends. Its imports are made once that is arranged (at the top of this
module: only the standard library and `ralph.lifetime`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from ralph.lifetime import die_with_parent

if TYPE_CHECKING:
    from ralph.config import Settings


async def _serve(settings: Settings, out: int) -> None:
    from ralph.agents.models import ModelFactory
    from ralph.background.agent_limit import RemoteRateLimit
    from ralph.composition import open_services
    from ralph.observability.events import UnitStats

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    units: set[asyncio.Task[None]] = set()

    def send(message: dict[str, Any]) -> None:
        os.write(out, json.dumps(message).encode() + b"\n")

    # the server's rate limit, asked over the pipe
    limit = RemoteRateLimit(send)
    models = ModelFactory(settings, limit=limit)
    async with open_services(
        settings, apply_migrations=False, role="agents", models=models
    ) as services:
        # each unit's figures go back with its answer: the server observes them (/metrics)
        stats: dict[tuple[str, str], UnitStats] = {}
        services.units.on_unit = lambda run, user, figures: stats.__setitem__((run, user), figures)

        async def unit(run_id: str, user_id: str) -> None:
            tokens = 0
            try:
                tokens = await services.units.run_delivered(run_id, user_id, where="unit")
            except Exception:  # logged and recorded: the server still hears it is done
                pass
            finally:
                send(
                    {
                        "done": [run_id, user_id],
                        "tokens": tokens,
                        "stats": stats.pop((run_id, user_id), None),
                    }
                )

        while line := await reader.readline():
            message = json.loads(line)
            if limit.answer(message):
                continue
            if "run" in message:
                job = asyncio.create_task(unit(message["run"], message["user"]))
                units.add(job)
                job.add_done_callback(units.discard)
            elif "cancel" in message:
                services.units.inflight.cancel(message["cancel"])
            elif "stop" in message:
                services.units.inflight.stop_all()
                if units:
                    await asyncio.wait(units)
                return
        # the server is gone without a word (killed): leave as abruptly, with nothing more
        # written, as if this process had died with it; its runs go to crash recovery
        os._exit(1)


def main() -> None:
    # its server's process id is its one argument
    if len(sys.argv) > 1:
        die_with_parent(int(sys.argv[1]))

    import uvloop

    from ralph.aio import freeze_startup_heap
    from ralph.config import Settings
    from ralph.logs import configure_logging

    # Ctrl-C in a terminal, or a service manager's SIGTERM to every process of the server,
    # must not cut the agents short: the server stops them through `stop`, after its grace
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)

    # byte by byte: what follows the first line is read by the event loop
    first = bytearray()
    while not first.endswith(b"\n"):
        byte = os.read(0, 1)
        if not byte:
            sys.exit(1)
        first += byte
    settings = Settings.model_validate_json(bytes(first))
    # stdout is the answer channel: keep it for answers, send anything else printed to stderr
    out = os.dup(1)
    os.dup2(2, 1)
    configure_logging(settings.log_level, settings.log_json)
    freeze_startup_heap()
    uvloop.run(_serve(settings, out))


if __name__ == "__main__":
    main()
