"""The queue of new boots agreed off the proxy-DHCP loop: bounded in boots and in packets
per boot, answered once agreed, and a failed agreement answers nothing."""

from __future__ import annotations

import asyncio
import threading

from netbootd.dhcp.newboots import NewBootQueue
from netbootd.inventory import Inventory
from netbootd.model import ClientFacts
from netbootd.planner import NewBoot, NoImages, Planner
from netbootd.settings import load_settings

A, B = "52:54:00:00:0a:01", "52:54:00:00:0a:02"


def new_boot(mac: str) -> NewBoot:
    settings = load_settings(None, {"policy": {"unknown": "default"}}, use_default_path=False)
    plan = Planner(lambda: settings, Inventory.empty, NoImages()).peek(ClientFacts(mac=mac))
    return NewBoot(mac, plan, 0.0)


def packet(n: int):
    return (bytes([n]), 1, "127.0.0.1", ("127.0.0.1", 68), False)


async def test_boots_wait_bounded_and_are_answered_once_agreed() -> None:
    loop = asyncio.get_running_loop()
    release = threading.Event()
    answered: list[tuple] = []

    def finish(new: NewBoot):  # the agreement: here it waits until the test says so
        release.wait(30)
        if new.mac == B:
            raise RuntimeError("etcd said no")
        return new.plan

    q = NewBootQueue(loop, finish, answered.append, max_boots=2, per_boot=2, workers=2)
    try:
        assert q.take(new_boot(A), packet(1))
        assert q.take(new_boot(A), packet(2))  # a retry waits with its boot
        assert q.take(new_boot(A), packet(3))  # beyond per_boot: dropped, still taken
        assert q.take(new_boot(B), packet(4))
        assert not q.take(new_boot("52:54:00:00:0a:03"), packet(5)), "full: the caller agrees"
        assert q.sizes() == {"waiting": 2, "taken": 2, "overflow": 1, "dropped": 1,
                             "failed": 0}
        release.set()
        while q.sizes()["waiting"]:
            await asyncio.sleep(0.01)
        assert answered == [packet(1), packet(2)], "A's packets; B's agreement failed"
        assert q.sizes()["failed"] == 1
    finally:
        q.close()
