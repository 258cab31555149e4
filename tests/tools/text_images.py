"""Synthetic document images for the PP-OCR models: lines of dark 5x7 bitmap-font text on a light, noisy
background, at several sizes and positions, normalised as PP-OCR expects (ImageNet mean and standard
deviation, RGB, NCHW float32).

Usage: text_images.py OUT.npz COUNT HEIGHT WIDTH [SEED]

Writes `x` (float32 [COUNT, 3, HEIGHT, WIDTH]). The same arguments give the same file.
"""

import sys

import numpy as np

# A 5x7 font: each glyph is 7 rows of 5 bits, written as 0/1 strings.
FONT = {
    "A": "01110 10001 10001 11111 10001 10001 10001",
    "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110",
    "D": "11110 10001 10001 10001 10001 10001 11110",
    "E": "11111 10000 10000 11110 10000 10000 11111",
    "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111",
    "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110",
    "K": "10001 10010 10100 11000 10100 10010 10001",
    "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001",
    "N": "10001 11001 10101 10011 10001 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110",
    "P": "11110 10001 10001 11110 10000 10000 10000",
    "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110",
    "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110",
    "W": "10001 10001 10001 10101 10101 11011 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100",
    "0": "01110 10011 10101 10101 11001 10001 01110",
    "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00110 01000 10000 11111",
    "3": "11110 00001 00001 01110 00001 00001 11110",
    "5": "11111 10000 11110 00001 00001 10001 01110",
    "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110",
}
GLYPHS = {c: np.array([[b == "1" for b in row] for row in g.split()], dtype=bool) for c, g in FONT.items()}
CHARS = sorted(GLYPHS)
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def page(rng, h, w):
    img = np.full((h, w, 3), rng.uniform(0.8, 1.0, 3), dtype=np.float32)
    img += rng.normal(0.0, 0.02, img.shape).astype(np.float32)
    y = int(rng.integers(2, 12))
    while True:
        scale = int(rng.integers(1, 4))
        line_h = 7 * scale
        if y + line_h >= h - 2:
            break
        x = int(rng.integers(2, 20))
        ink = rng.uniform(0.0, 0.3, 3).astype(np.float32)
        for _ in range(int(rng.integers(3, 30))):
            if x + 5 * scale >= w - 2:
                break
            c = CHARS[int(rng.integers(len(CHARS)))] if rng.uniform() > 0.15 else " "
            if c != " ":
                mask = np.kron(GLYPHS[c], np.ones((scale, scale), dtype=bool))
                img[y : y + line_h, x : x + 5 * scale][mask] = ink
            x += 6 * scale
        y += line_h + int(rng.integers(scale * 3, scale * 12))
    img = np.clip(img, 0.0, 1.0)
    return ((img - MEAN) / STD).transpose(2, 0, 1)


def main():
    out, count, h, w = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    seed = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    rng = np.random.default_rng(seed)
    x = np.stack([page(rng, h, w) for _ in range(count)]).astype(np.float32)
    np.savez(out, x=x)
    print(f"{count} images {h}x{w}, seed {seed}")


if __name__ == "__main__":
    main()
