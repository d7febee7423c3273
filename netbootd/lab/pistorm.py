"""A storm of emulated Raspberry Pi 5 TFTP boots against several replicas, with failover.

``python -m netbootd.lab.pistorm --servers IP,IP,IP --serials S1,S2,... --out r.json``
runs inside the lab's ``pi`` namespace. Every Pi loads the Pi 5 file set for its serial
(probe, then fetch, as the bootloader does: :mod:`netbootd.tftp.piclient`) from the
first server; when a server stops answering, the Pi's retry goes to the next one, as a
real Pi's next DHCP would land on a replica that is still up. ``--progress FILE`` gets
the number of files loaded so far (the test kills a replica at about a third).
The result: per Pi, every file's sha256, which server served it, cmdline.txt, and the
seconds its boot took (every Pi starts at once: the largest is the storm's duration).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from ..tftp.piclient import PI5_FILES, TftpError, fetch


async def one_pi(serial: str, servers: list[str], state: dict[str, Any], bind: str
                 ) -> dict[str, Any]:
    files: dict[str, Any] = {}
    text: dict[str, str] = {}
    at = 0
    t0 = time.monotonic()
    for name in PI5_FILES:
        for _attempt in range(3 * len(servers)):
            server = (servers[at % len(servers)], 69)
            try:
                await fetch(server, f"{serial}/{name}", probe=True, rrq_retry=1.0, tries=2,
                            file_timeout=60, bind_ip=bind)
                res = await fetch(server, f"{serial}/{name}", rrq_retry=1.0, tries=2,
                                  ack_timeout=1.0, file_timeout=120, bind_ip=bind)
                files[name] = {"sha256": hashlib.sha256(res.data).hexdigest(),
                               "server": server[0]}
                if name in ("cmdline.txt", "config.txt"):
                    text[name] = res.data.decode(errors="replace")
                break
            except TftpError as exc:
                if exc.code == 1:
                    files[name] = None  # not in this boot (pieeprom.sig, armstub)
                    break
                at += 1
            except (TimeoutError, OSError):
                at += 1  # this replica went away: the retry reaches the next one
        else:
            files[name] = {"error": "no replica answered"}
        state["done"] += 1
    return {"serial": serial, "files": files, "text": text,
            "seconds": round(time.monotonic() - t0, 4)}


async def storm(servers: list[str], serials: list[str], progress: Path | None,
                bind: str) -> list[dict]:
    state = {"done": 0}

    async def report() -> None:
        while True:
            if progress is not None:
                progress.write_text(str(state["done"]))
            await asyncio.sleep(0.1)

    reporter = asyncio.create_task(report())
    try:
        return list(await asyncio.gather(*(one_pi(s, servers, state, bind) for s in serials)))
    finally:
        reporter.cancel()
        if progress is not None:
            progress.write_text(str(state["done"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", required=True, help="replica addresses, comma-separated")
    ap.add_argument("--serials", required=True, help="Pi serials (hex), comma-separated")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--progress", type=Path)
    ap.add_argument("--bind", default="0.0.0.0", help="the Pis' own address")
    args = ap.parse_args(argv)
    result = asyncio.run(storm(args.servers.split(","), args.serials.split(","),
                               args.progress, args.bind))
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
