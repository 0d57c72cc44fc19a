#!/usr/bin/env python3
"""Writes a deterministic, uncompressed cpio archive (newc) from a spec.

Usage: mkcpio.py SPEC OUTPUT

No root needed (device nodes are just headers), and the same spec and
source files always give the same bytes: entries sorted by path (so every
directory precedes its contents), mtime 0, uid/gid 0, inode numbers in
order.

SPEC has one entry per line (blank lines and lines starting with # are
ignored); paths are archive paths, a leading / is optional:

    dir   PATH MODE
    file  PATH MODE SOURCE          (SOURCE: the rest of the line)
    slink PATH TARGET
    nod   PATH MODE c|b MAJOR MINOR

MODE is octal permission bits (e.g. 0755). Missing parent directories are
added with mode 0755.
"""

import stat
import sys


def fail(msg):
    sys.exit(f"mkcpio: {msg}")


def parse_spec(text):
    """Returns {path: (mode, data, rdev_major, rdev_minor)}."""
    entries = {}

    def add(lineno, path, mode, data=b"", rmaj=0, rmin=0):
        path = path.strip("/")
        if not path or path in (".", "..") or "/../" in f"/{path}/":
            fail(f"line {lineno}: bad path {path!r}")
        if path in entries:
            fail(f"line {lineno}: duplicate path {path!r}")
        entries[path] = (mode, data, rmaj, rmin)

    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kind, _, rest = line.partition(" ")
        try:
            if kind == "dir":
                path, perm = rest.split()
                add(lineno, path, stat.S_IFDIR | int(perm, 8))
            elif kind == "file":
                path, perm, source = rest.strip().split(maxsplit=2)
                with open(source, "rb") as f:
                    data = f.read()
                add(lineno, path, stat.S_IFREG | int(perm, 8), data)
            elif kind == "slink":
                path, target = rest.split()
                add(lineno, path, stat.S_IFLNK | 0o777, target.encode())
            elif kind == "nod":
                path, perm, typ, major, minor = rest.split()
                fmt = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}.get(typ)
                if fmt is None:
                    raise ValueError(f"device type {typ!r}")
                add(lineno, path, fmt | int(perm, 8), b"", int(major), int(minor))
            else:
                raise ValueError(f"unknown entry kind {kind!r}")
        except (ValueError, OSError) as e:
            fail(f"line {lineno}: {e}")

    # Parents of every entry, so the kernel can create each path in order.
    for path in list(entries):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in entries:
                entries[parent] = (stat.S_IFDIR | 0o755, b"", 0, 0)
            elif not stat.S_ISDIR(entries[parent][0]):
                fail(f"{parent!r} is not a directory but has entries")
    return entries


def header(ino, mode, nlink, size, rmaj, rmin, namesize):
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rmaj, rmin, namesize, 0]
    return b"070701" + b"".join(b"%08x" % f for f in fields)


def pad4(n):
    return b"\0" * (-n % 4)


def write_cpio(entries, out):
    ino = 0

    def entry(name, mode, data=b"", rmaj=0, rmin=0, nlink=1):
        nonlocal ino
        ino += 1
        name_b = name.encode() + b"\0"
        h = header(ino, mode, nlink, len(data), rmaj, rmin, len(name_b))
        out.write(h + name_b + pad4(len(h) + len(name_b)))
        out.write(data + pad4(len(data)))

    for path in sorted(entries, key=lambda p: p.encode()):
        mode, data, rmaj, rmin = entries[path]
        entry(path, mode, data, rmaj, rmin, 2 if stat.S_ISDIR(mode) else 1)
    ino = -1  # the trailer has inode 0
    entry("TRAILER!!!", 0, nlink=1)
    # Pad the archive to a 512-byte block, as cpio(1) does.
    total = out.tell()
    out.write(b"\0" * (-total % 512))


def main():
    if len(sys.argv) != 3:
        fail("usage: mkcpio.py SPEC OUTPUT")
    with open(sys.argv[1], encoding="utf-8") as f:
        entries = parse_spec(f.read())
    with open(sys.argv[2], "wb") as out:
        write_cpio(entries, out)


if __name__ == "__main__":
    main()
