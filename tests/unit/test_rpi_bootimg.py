"""boot.img is deterministic FAT with fixed timestamps; boot.sig is what openssl would sign."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from netbootd.rpi import sign
from netbootd.rpi.bootimg import Content, write_image


def tree(root: Path) -> list[tuple[str, Path]]:
    (root / "overlays").mkdir(parents=True)
    files = {"kernel_2712.img": b"K" * 300_000, "bcm2712-rpi-5-b.dtb": b"DTB",
             "overlays/overlay_map.dtb": b"MAP", "overlays/vc4-kms-v3d-pi5.dtbo": b"V"}
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return [(rel, root / rel) for rel in files]


def test_same_inputs_give_the_same_bytes_and_fixed_times(tmp_path: Path) -> None:
    content = Content.make("pi", "1", tree(tmp_path / "src"),
                           {"cmdline.txt": b"console=tty1\n", "config.txt": b"arm_64bit=1\n"})
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    write_image(content, a, tmp_path / "wa")
    (tmp_path / "src" / "kernel_2712.img").touch()  # a newer mtime changes nothing
    write_image(content, b, tmp_path / "wb")
    assert a.read_bytes() == b.read_bytes()
    listing = subprocess.run(["mdir", "-i", str(a), "::/overlays"], capture_output=True,
                             text=True, check=True, env={"MTOOLSRC": "/dev/null",
                                                         "PATH": "/usr/bin:/bin"}).stdout
    assert "vc4-kms-v3d-pi5.dtbo" in listing and "2000-01-01" in listing
    info = subprocess.run(["minfo", "-i", str(a), "::"], capture_output=True, text=True,
                          check=True, env={"MTOOLSRC": "/dev/null", "PATH": "/usr/bin:/bin"})
    assert "FAT16" in info.stdout
    other = Content.make("pi", "1", tree(tmp_path / "src2"),
                         {"cmdline.txt": b"console=tty2\n", "config.txt": b"arm_64bit=1\n"})
    assert other.key != content.key


def test_boot_sig_is_an_rsa2048_pkcs1v15_sha256_signature_of_the_image(tmp_path: Path) -> None:
    _priv, pub, key = sign.write_key_pair(tmp_path)
    img = tmp_path / "boot.img"
    img.write_bytes(b"FAT" * 1000)
    sha = sign.file_sha256(img)
    text = sign.boot_sig(key, sha, 1733400000)
    lines = text.splitlines()
    assert lines[0] == sha and lines[1] == "ts: 1733400000" and lines[2].startswith("rsa2048: ")
    assert len(bytes.fromhex(lines[2].split(": ")[1])) == 256
    # what `openssl dgst -sign key.pem -sha256 boot.img` gives: PKCS#1 v1.5 over the bytes
    public = key.public_key()
    public.verify(bytes.fromhex(lines[2].split(": ")[1]), img.read_bytes(), padding.PKCS1v15(),
                  hashes.SHA256())
    assert sign.verify_sig(text, sha, public)
    assert not sign.verify_sig(text, "0" * 64, public)
    assert (tmp_path / "http-boot.key").stat().st_mode & 0o777 == 0o600
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_openssl_verifies_boot_sig_with_the_generated_public_key(tmp_path: Path) -> None:
    _priv, pub, key = sign.write_key_pair(tmp_path)
    img = tmp_path / "boot.img"
    img.write_bytes(b"\x00FAT image" * 5000)
    text = sign.boot_sig(key, sign.file_sha256(img), 1)
    raw = tmp_path / "sig.bin"
    raw.write_bytes(bytes.fromhex(text.splitlines()[2].split(": ")[1]))
    out = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(pub), "-signature",
                          str(raw), str(img)], check=False, capture_output=True, text=True)
    assert out.returncode == 0 and "Verified OK" in out.stdout


def test_a_tampered_image_checked_by_many_at_once_is_refused_once_and_rebuilt_once(
        tmp_path: Path) -> None:
    """A Pi's request and the prebuilder may check one cached image at the same moment:
    the bad bytes are counted and deleted once, and no check deletes the rebuilt image."""
    import threading
    from types import SimpleNamespace

    from netbootd.rpi.bootimg import BootImages

    priv, _pub, _key = sign.write_key_pair(tmp_path / "keys")
    settings = SimpleNamespace(rpi=SimpleNamespace(http_boot=SimpleNamespace(key_file=priv)),
                               http_boot_dir=tmp_path / "cache")
    images = BootImages(lambda: settings, parallel=2)
    content = Content.make("pi", "1", tree(tmp_path / "src"),
                           {"cmdline.txt": b"console=tty1\n", "config.txt": b"arm_64bit=1\n"})
    first = images._build(content)
    with open(first.image, "r+b") as f:  # one flipped byte in the middle
        f.seek(first.size // 2)
        byte = f.read(1)
        f.seek(first.size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    start = threading.Barrier(8)
    results: list[object] = []

    def check() -> None:
        start.wait()
        hit = images._cached(content)
        results.append(hit if hit is not None else images._build(content))

    threads = [threading.Thread(target=check) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert images.refused == 1
    assert all(r is not None for r in results)
    final = images._cached(content)
    assert final is not None and sign.file_sha256(final.image) == final.sha256
