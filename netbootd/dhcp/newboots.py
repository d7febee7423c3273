"""New boots agreed with the other replicas off the proxy-DHCP loop.

With replicas (``cluster.backend: etcd``) the first request of a boot costs one etcd
round trip: the replicas agree on its plan (``cluster/sessions.py``). Waited for on the
DHCP loop, that round trip (a raft commit, so a disk sync on the etcd members: 1-3 ms on
loopback and SSDs, tens of ms on SD cards) would hold every other client's answer, and
new boots would be agreed one at a time. Here the agreement runs in a few worker
threads instead; the loop goes on answering, and when a boot's plan is agreed the
packets that waited for it are answered from the planner's memory like any later one.

Bounded: at most ``max_boots`` boots wait at once, each with at most ``per_boot`` packets
(a client's retries; more are dropped: the client retries again). Beyond ``max_boots``
the caller agrees the boot on the loop itself, as without this queue, so a flood of new
MACs degrades to the plain cost and never grows a table.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..model import BootPlan
    from ..planner import NewBoot

log = logging.getLogger("netbootd.dhcp")

#: What a waiting packet carries back to the responder: data, ifindex, local_ip, peer, pxe.
Packet = tuple[bytes, int, "str | None", tuple[str, int], bool]


class NewBootQueue:
    """Agree new boots in worker threads; answer their packets on the loop when done.

    ``finish`` agrees one boot (``Planner.finish``: blocking, one round trip);
    ``answer`` is called on the loop with each packet that waited, once its boot is agreed.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 finish: Callable[[NewBoot], BootPlan], answer: Callable[[Packet], None],
                 *, max_boots: int = 64, per_boot: int = 4, workers: int = 8) -> None:
        self._loop = loop
        self._finish = finish
        self._answer = answer
        self.max_boots = max_boots
        self.per_boot = per_boot
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="dhcp-new-boot")
        self._waiting: dict[str, list[Packet]] = {}
        self.taken = 0  #: boots agreed off the loop
        self.overflow = 0  #: boots agreed on the loop because the queue was full
        self.dropped = 0  #: retries beyond ``per_boot`` while their boot was agreed
        self.failed = 0

    def take(self, new: NewBoot, packet: Packet) -> bool:
        """Queue this packet's boot for agreement; False when the queue is full (the
        caller then agrees it itself). Called on the loop."""
        waiting = self._waiting.get(new.mac)
        if waiting is not None:  # a retry while its boot is being agreed
            if len(waiting) < self.per_boot:
                waiting.append(packet)
            else:
                self.dropped += 1
            return True
        if len(self._waiting) >= self.max_boots:
            self.overflow += 1
            return False
        self._waiting[new.mac] = [packet]
        self.taken += 1
        future = self._loop.run_in_executor(self._pool, self._finish, new)
        future.add_done_callback(lambda f, mac=new.mac: self._agreed(mac, f))
        return True

    def _agreed(self, mac: str, future: asyncio.Future[Any]) -> None:
        packets = self._waiting.pop(mac, [])
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self.failed += 1
            log.error("agreeing the new boot of %s failed: %r", mac, exc)
            return
        for packet in packets:
            self._answer(packet)

    def sizes(self) -> dict[str, int]:
        return {"waiting": len(self._waiting), "taken": self.taken,
                "overflow": self.overflow, "dropped": self.dropped, "failed": self.failed}

    def close(self) -> None:
        """Stop: boots being agreed finish in their threads; nothing more is answered."""
        self._waiting.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
