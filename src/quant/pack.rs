//! Packing of sub-byte codes into bytes, in the layouts ONNX and onnxruntime read.
//!
//! - ONNX INT4/UINT4 (and INT2/UINT2) tensors pack elements densely in index order, the first element in
//!   the lowest bits of each byte; an odd count leaves the high bits of the last byte zero.
//! - com.microsoft MatMulNBits takes B as `[N, blocks, block_size·bits/8]` bytes: for each output column
//!   n, the K codes of that column, block after block, packed low bits first, stored unsigned (a
//!   symmetric code q is stored as q + 2^(bits−1), the default zero point). Zero points, when given, are
//!   packed the same way per column, `ceil(blocks·bits/8)` bytes each.

/// Packs codes of `bits` (1, 2, 4 or 8) into bytes, first element in the lowest bits. Codes are taken
/// modulo 2^bits, so signed codes pack as their two's-complement low bits (the ONNX INT4/INT2 layout).
pub fn pack_bits(codes: &[i32], bits: u32) -> Vec<u8> {
    assert!(matches!(bits, 1 | 2 | 4 | 8), "bits must divide 8");
    let per = (8 / bits) as usize;
    let mask = (1u32 << bits) - 1;
    codes
        .chunks(per)
        .map(|c| {
            c.iter().enumerate().fold(0u8, |b, (i, &q)| {
                b | (((q as u32 & mask) as u8) << (i as u32 * bits))
            })
        })
        .collect()
}

/// Unpacks `count` codes of `bits` from bytes; `signed` sign-extends them.
pub fn unpack_bits(bytes: &[u8], bits: u32, count: usize, signed: bool) -> Vec<i32> {
    let per = (8 / bits) as usize;
    let mask = (1u32 << bits) - 1;
    (0..count)
        .map(|i| {
            let v = ((bytes[i / per] as u32) >> ((i % per) as u32 * bits)) & mask;
            if signed && v >= 1 << (bits - 1) {
                v as i32 - (1 << bits)
            } else {
                v as i32
            }
        })
        .collect()
}

/// MatMulNBits' B: codes given row-major `[n, k]` (one row per output column), stored unsigned by adding
/// `offset` (2^(bits−1) for symmetric codes, 0 for asymmetric ones), padded with `offset`-coded zeros to
/// whole blocks. Returns `[n, blocks, block·bits/8]` bytes.
pub fn matmul_nbits_b(
    codes: &[i32],
    n: usize,
    k: usize,
    bits: u32,
    block: usize,
    offset: i32,
) -> Vec<u8> {
    let blocks = k.div_ceil(block);
    let mut out = Vec::with_capacity(n * blocks * block * bits as usize / 8);
    let mut row = vec![offset; blocks * block];
    for r in 0..n {
        for (dst, &q) in row.iter_mut().zip(&codes[r * k..(r + 1) * k]) {
            *dst = q + offset;
        }
        row[k..].iter_mut().for_each(|v| *v = offset);
        out.extend(pack_bits(&row, bits));
    }
    out
}

/// MatMulNBits' zero points: `[n, blocks]` values, packed per column into `ceil(blocks·bits/8)` bytes.
pub fn matmul_nbits_zero_points(zps: &[i32], n: usize, blocks: usize, bits: u32) -> Vec<u8> {
    (0..n)
        .flat_map(|r| pack_bits(&zps[r * blocks..(r + 1) * blocks], bits))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int4_packs_low_nibble_first() {
        // ONNX: INT4 [1, -2, 7] → bytes 0xE1, 0x07.
        assert_eq!(pack_bits(&[1, -2, 7], 4), vec![0xE1, 0x07]);
        assert_eq!(unpack_bits(&[0xE1, 0x07], 4, 3, true), vec![1, -2, 7]);
        assert_eq!(unpack_bits(&[0xE1, 0x07], 4, 3, false), vec![1, 14, 7]);
    }

    #[test]
    fn two_bit_codes_pack_four_to_a_byte() {
        assert_eq!(pack_bits(&[0, 1, 2, 3, 1], 2), vec![0b1110_0100, 0b01]);
        assert_eq!(unpack_bits(&[0b1110_0100], 2, 4, true), vec![0, 1, -2, -1]);
    }

    #[test]
    fn round_trip_every_width() {
        for bits in [1u32, 2, 4, 8] {
            let codes: Vec<i32> = (0..37).map(|i| (i * 7) % (1 << bits)).collect();
            let packed = pack_bits(&codes, bits);
            assert_eq!(packed.len(), (37 * bits as usize).div_ceil(8));
            assert_eq!(unpack_bits(&packed, bits, 37, false), codes);
        }
    }

    #[test]
    fn matmul_nbits_layout_pads_the_last_block() {
        // n = 2 columns, k = 3, block 4, symmetric 4-bit codes (offset 8).
        let codes = [-8, 0, 7, 1, 2, 3];
        let b = matmul_nbits_b(&codes, 2, 3, 4, 4, 8);
        // Column 0: stored [0, 8, 15, 8(pad)] → bytes 0x80, 0x8F.
        assert_eq!(b, vec![0x80, 0x8F, 0xA9, 0x8B]);
        let zp = matmul_nbits_zero_points(&[3, 4, 5, 6, 7, 8], 2, 3, 4);
        assert_eq!(zp, vec![0x43, 0x05, 0x76, 0x08]);
    }
}
