"""Raspberry Pi bootloader artefacts that netbootd makes itself: the signed HTTP-boot
``boot.img`` / ``boot.sig`` (:mod:`.bootimg`, :mod:`.sign`), bootloader updates
(:mod:`.eeprom`) and an emulated Pi 5 HTTP-boot client (:mod:`.httpclient`, which reads
the image with :mod:`.fatread`)."""
