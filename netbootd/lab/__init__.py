"""A netboot lab in network namespaces: used by the e2e tests and by ``netbootd lab``.

Pieces, each with one job (see docs/lab.md for the recipe, timings and pitfalls):

* :mod:`.netns`    namespaces, bridge, veths, tap, addresses; guaranteed teardown
* :mod:`.sitedhcp` dnsmasq-base as the site DHCP server (address pool + RA only)
* :mod:`.nfs`      rpcbind + nfs-ganesha in the server namespace
* :mod:`.guests`   QEMU BIOS (SeaBIOS + iPXE) and UEFI (OVMF) guests, serial log, hard timeout
* :mod:`.capture`  tcpdump into a pcap inside a namespace
* :mod:`.demo`     the ``netbootd lab`` command

Nothing here touches the root namespace's addresses or routes: every address lives inside
namespaces the lab created, and teardown kills only the PIDs inside them.
"""
