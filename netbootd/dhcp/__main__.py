"""Run the proxy-DHCP service on its own: ``python -m netbootd.dhcp --config FILE``.

Used by the namespace tests and the benchmark (inside ``ip netns exec``), and handy
when debugging a firmware's DHCP on a bench without the rest of the daemon. Prints
``ready`` on stdout once the sockets are bound; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from ..daemon import build_app, settle_heap
from ..inventory import Inventory, load_inventory
from ..settings import load_settings
from .proxy import create


async def _run(config: Path | None) -> int:
    settings = load_settings(config, use_default_path=config is None)
    inv_path = settings.paths.inventory
    inventory = load_inventory(inv_path) if inv_path.exists() else Inventory.empty()
    app = build_app(settings, inventory=inventory)
    svc = create(app)  # the service gets narrow views of the App, as in the daemon
    await svc.start()
    settle_heap()
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await svc.stop()
    app.events.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m netbootd.dhcp", description=__doc__)
    p.add_argument("--config", type=Path, help="netbootd.yaml (default: usual search)")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return asyncio.run(_run(args.config))


if __name__ == "__main__":
    raise SystemExit(main())
