"""Reference retention metrics, computed independently of quench with numpy in float64.

usage: metrics_ref.py REFERENCE.npz CANDIDATE.npz NAME [NAME ...]
Prints JSON {name: {sqnr_db, cosine, rel_l2, max_abs, top1_agreement}} for the named arrays
(top-1 along the last axis, first index on ties).
"""
import json
import sys

import numpy as np


def metrics(r, c):
    r = r.astype(np.float64).ravel()
    c = c.astype(np.float64).ravel()
    d = r - c
    sr, sc, sd = float(r @ r), float(c @ c), float(d @ d)
    return {
        "sqnr_db": "inf" if sd == 0 else 10 * np.log10(sr / sd),
        "cosine": float(r @ c) / np.sqrt(sr * sc),
        "rel_l2": np.sqrt(sd / sr),
        "max_abs": float(np.abs(d).max()),
    }


def main():
    ref, cand = np.load(sys.argv[1]), np.load(sys.argv[2])
    out = {}
    for name in sys.argv[3:]:
        r, c = ref[name], cand[name]
        m = metrics(r, c)
        rows_r = r.reshape(-1, r.shape[-1])
        rows_c = c.reshape(-1, c.shape[-1])
        m["top1_agreement"] = float(np.mean(rows_r.argmax(-1) == rows_c.argmax(-1)))
        out[name] = m
    print(json.dumps(out))


main()
