"""Magika input features of real files, the same on every machine, for retention tests.

Usage: magika_features.py OUT.npz COUNT [ROOT ...]

Walks the roots (default: the installed folders of the packages pinned in tests/requirements.txt --
numpy, onnx, onnxruntime -- so every machine reads the same files), keeps regular files of at least 64
bytes outside __pycache__ (bytecode written at install), orders them by the sha256 of their path
relative to their root's parent (a deterministic shuffle that does not depend on where the packages
are installed), takes at most 6 per file extension so that many content types are represented, and
writes `bytes` (int32 [COUNT, 2048]) and nothing else to OUT.npz (the model's only input).

The features follow Magika's documented extraction for its standard_v3_3 model (config: beg_size 1024,
end_size 1024, block_size 4096, padding_token 256): read at most block_size bytes at each end of the
file, strip leading whitespace from the beginning part and trailing whitespace from the end part (both
ends of both parts when the whole file fits in one block), keep the first beg_size / last end_size
bytes, and pad with the padding token after the beginning / before the end.
"""

import hashlib
import os
import sys
import sysconfig

import numpy as np

BEG, END, BLOCK, PAD = 1024, 1024, 4096, 256
WHITESPACE = b" \t\n\r\x0b\x0c"


def features(path):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = min(BLOCK, size)
        head = f.read(n)
        f.seek(size - n)
        tail = f.read(n)
    if size <= BLOCK:
        head, tail = head.strip(WHITESPACE), tail.strip(WHITESPACE)
    else:
        head, tail = head.lstrip(WHITESPACE), tail.rstrip(WHITESPACE)
    beg = list(head[:BEG]) + [PAD] * (BEG - min(BEG, len(head)))
    end = list(tail[-END:]) if tail else []
    end = [PAD] * (END - len(end)) + end
    return beg + end


def main():
    out, count = sys.argv[1], int(sys.argv[2])
    purelib = sysconfig.get_paths()["purelib"]
    roots = sys.argv[3:] or [os.path.join(purelib, p) for p in ("numpy", "onnx", "onnxruntime")]
    found = []
    for root in roots:
        base = os.path.dirname(os.path.abspath(root))
        for d, dirs, files in os.walk(root, followlinks=False):
            dirs[:] = sorted(x for x in dirs if x != "__pycache__")
            for name in files:
                p = os.path.join(d, name)
                try:
                    if os.path.isfile(p) and not os.path.islink(p) and os.path.getsize(p) >= 64:
                        found.append((os.path.relpath(p, base), p))
                except OSError:
                    pass
    found.sort(key=lambda rp: hashlib.sha256(rp[0].encode()).hexdigest())
    found = [p for _, p in found]
    per_ext, picked = {}, []
    for p in found:
        ext = os.path.splitext(p)[1].lower()
        if per_ext.get(ext, 0) >= 6:
            continue
        try:
            feats = features(p)
        except OSError:
            continue
        per_ext[ext] = per_ext.get(ext, 0) + 1
        picked.append((p, feats))
        if len(picked) == count:
            break
    if len(picked) < count:
        # Not enough distinct extensions: fill with further files in the same order.
        seen = {p for p, _ in picked}
        for p in found:
            if len(picked) == count:
                break
            if p not in seen:
                try:
                    picked.append((p, features(p)))
                except OSError:
                    pass
    arr = np.array([f for _, f in picked], dtype=np.int32)
    np.savez(out, bytes=arr)
    exts = len({os.path.splitext(p)[1].lower() for p, _ in picked})
    print(f"{len(picked)} files, {exts} extensions")


if __name__ == "__main__":
    main()
