//! Convolutions as matrix products: ONNX `Conv` / `ConvInteger` geometry (one group, one or two spatial
//! axes) and the im2col that turns an NCHW input into the rows `A[N·OH·OW, KH·KW·C]` of a product with
//! the weight `W[M, C, KH, KW]` read as `B[KH·KW·C, M]` (taps outermost: see `Geometry::weight_index`).

/// ONNX `auto_pad`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AutoPad {
    NotSet,
    Valid,
    SameUpper,
    SameLower,
}

impl AutoPad {
    pub fn parse(s: &str) -> Option<AutoPad> {
        Some(match s {
            "" | "NOTSET" => AutoPad::NotSet,
            "VALID" => AutoPad::Valid,
            "SAME_UPPER" => AutoPad::SameUpper,
            "SAME_LOWER" => AutoPad::SameLower,
            _ => return None,
        })
    }

    pub fn code(self) -> i64 {
        self as i64
    }

    pub fn from_code(c: i64) -> Option<AutoPad> {
        [
            AutoPad::NotSet,
            AutoPad::Valid,
            AutoPad::SameUpper,
            AutoPad::SameLower,
        ]
        .get(usize::try_from(c).ok()?)
        .copied()
    }
}

/// The shape of a convolution with one group. A one-dimensional one (`N, C, L`) is taken as two
/// dimensions with `W = 1` (kernel, stride and dilation 1 and no padding on that axis).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// Spatial axes of the input: 1 or 2.
    pub rank: usize,
    /// Input channels `C`.
    pub channels: usize,
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    /// `[begin H, begin W, end H, end W]`, ONNX's order (used when `auto_pad` is NOTSET).
    pub pads: [usize; 4],
    pub auto_pad: AutoPad,
}

impl Geometry {
    /// From ONNX attributes (`pads` in ONNX order, all per spatial axis; absent ones default). `None`
    /// when the rank is not 1 or 2 or a value is out of range.
    pub fn new(
        channels: usize,
        kernel: &[i64],
        strides: Option<&[i64]>,
        dilations: Option<&[i64]>,
        pads: Option<&[i64]>,
        auto_pad: AutoPad,
    ) -> Option<Geometry> {
        let rank = kernel.len();
        if !(1..=2).contains(&rank) {
            return None;
        }
        // Two values ≥ 1 per attribute; the missing second axis of a 1-D convolution is 1.
        let per_axis = |v: Option<&[i64]>| -> Option<[usize; 2]> {
            let v = v.unwrap_or(&[]);
            if !(v.is_empty() || v.len() == rank) {
                return None;
            }
            let get = |ax: usize| {
                if ax < rank {
                    v.get(ax).copied().unwrap_or(1)
                } else {
                    1
                }
            };
            let (a, b) = (get(0), get(1));
            (a >= 1 && b >= 1).then_some([a as usize, b as usize])
        };
        let kernel = per_axis(Some(kernel))?;
        let strides = per_axis(strides)?;
        let dilations = per_axis(dilations)?;
        let p = pads.unwrap_or(&[]);
        if !(p.is_empty() || p.len() == 2 * rank) || p.iter().any(|&v| v < 0) {
            return None;
        }
        let pad = |i: usize| p.get(i).copied().unwrap_or(0) as usize;
        let pads = if rank == 2 {
            [pad(0), pad(1), pad(2), pad(3)]
        } else {
            [pad(0), 0, pad(1), 0]
        };
        Some(Geometry {
            rank,
            channels,
            kernel,
            strides,
            dilations,
            pads,
            auto_pad,
        })
    }

    /// `C · KH · KW`: the reduction size of the product.
    pub fn k(&self) -> usize {
        self.channels * self.kernel[0] * self.kernel[1]
    }

    /// The extent one kernel covers on axis `ax`.
    pub fn span(&self, ax: usize) -> usize {
        (self.kernel[ax] - 1) * self.dilations[ax] + 1
    }

    /// `(begin, end)` padding of axis `ax` for an input extent `len`.
    pub fn pads_of(&self, ax: usize, len: usize) -> (usize, usize) {
        match self.auto_pad {
            AutoPad::NotSet => (self.pads[ax], self.pads[ax + 2]),
            AutoPad::Valid => (0, 0),
            AutoPad::SameUpper | AutoPad::SameLower => {
                let out = len.div_ceil(self.strides[ax]);
                let total =
                    ((out.max(1) - 1) * self.strides[ax] + self.span(ax)).saturating_sub(len);
                let small = total / 2;
                if self.auto_pad == AutoPad::SameUpper {
                    (small, total - small)
                } else {
                    (total - small, small)
                }
            }
        }
    }

    /// The output extent of axis `ax` for an input extent `len` (`None` if the kernel does not fit).
    pub fn out_len(&self, ax: usize, len: usize) -> Option<usize> {
        let (b, e) = self.pads_of(ax, len);
        let padded = len + b + e;
        (padded >= self.span(ax)).then(|| (padded - self.span(ax)) / self.strides[ax] + 1)
    }

    /// Where column `r` of [`Geometry::im2col`]'s rows sits in the ONNX weight's reduction axis
    /// (`W[m]` flattened as `(c, i, j)`): im2col lays its columns tap by tap, `(i, j, c)`, so that each
    /// tap is a run of channels.
    pub fn weight_index(&self, r: usize) -> usize {
        let [kh, kw] = self.kernel;
        let (tap, c) = (r / self.channels, r % self.channels);
        (c * kh + tap / kw) * kw + tap % kw
    }

    /// Whether each output position reads exactly its own input position (a 1×1 kernel, stride 1,
    /// no padding): the rows are then the input with its channels last.
    pub fn pointwise(&self, hw: [usize; 2]) -> bool {
        self.kernel == [1, 1]
            && self.strides == [1, 1]
            && self.pads_of(0, hw[0]) == (0, 0)
            && self.pads_of(1, hw[1]) == (0, 0)
    }

    /// `cols[N·OH·OW, K]` from `x[N, C, H, W]`: row `(b, oh, ow)`, column `(i, j, c)` (see
    /// [`Geometry::weight_index`]) holds `x[b, c, oh·sh − pad_top + i·dh, ow·sw − pad_left + j·dw]`,
    /// or `pad` outside the input. Each image is first laid channels-last, so a tap copies `C`
    /// consecutive values (and a run of taps along a row, `C` per tap, when the dilation is 1).
    pub fn im2col<T: Copy>(&self, x: &[T], n: usize, hw: [usize; 2], pad: T) -> Option<Vec<T>> {
        let mut cols = Vec::new();
        self.im2col_into(x, n, hw, pad, &mut cols)?;
        Some(cols)
    }

    /// [`Geometry::im2col`] into `cols`, which is resized to fit (so that a caller going image by
    /// image reuses one buffer).
    pub fn im2col_into<T: Copy>(
        &self,
        x: &[T],
        n: usize,
        hw: [usize; 2],
        pad: T,
        cols: &mut Vec<T>,
    ) -> Option<()> {
        let [h, w] = hw;
        let (oh, ow) = (self.out_len(0, h)?, self.out_len(1, w)?);
        let (pt, pl) = (self.pads_of(0, h).0, self.pads_of(1, w).0);
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.strides;
        let [dh, dw] = self.dilations;
        let c = self.channels;
        let plane = h * w;
        assert_eq!(x.len(), n * c * plane, "input of {} values", x.len());
        let k = self.k();
        cols.clear();
        if self.pointwise(hw) {
            cols.resize(n * plane * c, pad);
            for (image, out) in x
                .chunks_exact(c * plane)
                .zip(cols.chunks_exact_mut(c * plane))
            {
                transpose(image, c, plane, out);
            }
            return Some(());
        }
        cols.resize(n * oh * ow * k, pad);
        let mut last = vec![pad; plane * c];
        // Per output column z: the kernel taps j that land inside the row, and where the first lands.
        let taps: Vec<(usize, usize, usize)> = (0..ow)
            .map(|z| {
                let inside = |j: usize| (z * sw + j * dw).checked_sub(pl).filter(|&v| v < w);
                let j0 = (0..kw).find(|&j| inside(j).is_some()).unwrap_or(kw);
                let j1 = (j0..kw).take_while(|&j| inside(j).is_some()).count() + j0;
                (j0, j1, inside(j0).unwrap_or(0))
            })
            .collect();
        let mut rows = cols.chunks_exact_mut(k);
        for image in x.chunks_exact(c * plane) {
            transpose(image, c, plane, &mut last);
            for y in 0..oh {
                // The kernel rows i that land inside the image, and the first one's input row.
                let inside = |i: usize| (y * sh + i * dh).checked_sub(pt).filter(|&v| v < h);
                let i0 = (0..kh).find(|&i| inside(i).is_some()).unwrap_or(kh);
                let i1 = (i0..kh).take_while(|&i| inside(i).is_some()).count() + i0;
                let iy0 = inside(i0).unwrap_or(0);
                for &(j0, j1, ix0) in &taps {
                    let row = rows.next().unwrap();
                    for i in i0..i1 {
                        let at = ((iy0 + (i - i0) * dh) * w + ix0) * c;
                        let dst = (i * kw + j0) * c;
                        if dw == 1 {
                            let len = (j1 - j0) * c;
                            row[dst..][..len].copy_from_slice(&last[at..][..len]);
                        } else {
                            for t in 0..j1 - j0 {
                                row[dst + t * c..][..c]
                                    .copy_from_slice(&last[at + t * dw * c..][..c]);
                            }
                        }
                    }
                }
            }
        }
        Some(())
    }
}

/// `out[p · rows + r] = x[r · cols + p]`: the `[rows, cols]` matrix `x` transposed, a tile of 16×16 at
/// a time so that both sides stay in cache.
pub fn transpose<T: Copy>(x: &[T], rows: usize, cols: usize, out: &mut [T]) {
    const TILE: usize = 16;
    assert!(x.len() >= rows * cols && out.len() >= rows * cols);
    for r0 in (0..rows).step_by(TILE) {
        let r1 = (r0 + TILE).min(rows);
        for p0 in (0..cols).step_by(TILE) {
            let p1 = (p0 + TILE).min(cols);
            for p in p0..p1 {
                let dst = &mut out[p * rows + r0..p * rows + r1];
                for (d, src) in dst.iter_mut().zip(x[r0 * cols + p..].iter().step_by(cols)) {
                    *d = *src;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kernel, strides, dilations, pads, auto_pad and the input's spatial extents of one case.
    type Case = (
        &'static [i64],
        &'static [i64],
        &'static [i64],
        &'static [i64],
        AutoPad,
        &'static [usize],
    );

    /// A direct convolution, summed in f64, against the product of im2col's rows with the weight.
    #[test]
    fn im2col_product_equals_the_direct_convolution() {
        let cases: &[Case] = &[
            (
                &[3, 3],
                &[1, 1],
                &[1, 1],
                &[1, 1, 1, 1],
                AutoPad::NotSet,
                &[7, 6],
            ),
            (
                &[3, 2],
                &[2, 1],
                &[1, 2],
                &[0, 1, 2, 0],
                AutoPad::NotSet,
                &[9, 8],
            ),
            (&[5, 1], &[1, 1], &[1, 1], &[], AutoPad::NotSet, &[11, 1]),
            (&[3, 3], &[2, 2], &[1, 1], &[], AutoPad::SameUpper, &[7, 8]),
            (&[4, 4], &[3, 2], &[1, 1], &[], AutoPad::SameLower, &[10, 5]),
            (&[2, 2], &[1, 1], &[2, 2], &[], AutoPad::Valid, &[6, 6]),
            (&[3], &[2], &[1], &[1, 1], AutoPad::NotSet, &[13]),
            (&[1, 1], &[1, 1], &[1, 1], &[], AutoPad::NotSet, &[5, 7]),
            (&[1, 1], &[2, 1], &[1, 1], &[], AutoPad::NotSet, &[5, 7]),
            (
                &[1, 3],
                &[1, 1],
                &[1, 3],
                &[0, 3, 0, 3],
                AutoPad::NotSet,
                &[4, 9],
            ),
        ];
        let (n, c, m) = (2, 3, 4);
        for &(kernel, strides, dilations, pads, auto_pad, spatial) in cases {
            let g = Geometry::new(
                c,
                kernel,
                Some(strides),
                Some(dilations),
                Some(pads),
                auto_pad,
            )
            .unwrap();
            let hw = [spatial[0], spatial.get(1).copied().unwrap_or(1)];
            let x: Vec<f32> = (0..n * c * hw[0] * hw[1])
                .map(|i| ((i * 7919) % 23) as f32 - 11.0)
                .collect();
            let k = g.k();
            let w: Vec<f32> = (0..m * k).map(|i| ((i * 31) % 7) as f32 - 3.0).collect();
            let cols = g.im2col(&x, n, hw, 0.0).unwrap();
            let (oh, ow) = (g.out_len(0, hw[0]).unwrap(), g.out_len(1, hw[1]).unwrap());
            assert_eq!(cols.len(), n * oh * ow * k);
            let (pt, pl) = (
                g.pads_of(0, hw[0]).0 as isize,
                g.pads_of(1, hw[1]).0 as isize,
            );
            for b in 0..n {
                for o in 0..m {
                    for y in 0..oh {
                        for z in 0..ow {
                            let mut want = 0f64;
                            for ci in 0..c {
                                for i in 0..g.kernel[0] {
                                    for j in 0..g.kernel[1] {
                                        let iy =
                                            (y * g.strides[0] + i * g.dilations[0]) as isize - pt;
                                        let ix =
                                            (z * g.strides[1] + j * g.dilations[1]) as isize - pl;
                                        if iy < 0
                                            || ix < 0
                                            || iy >= hw[0] as isize
                                            || ix >= hw[1] as isize
                                        {
                                            continue;
                                        }
                                        let xv = x[((b * c + ci) * hw[0] + iy as usize) * hw[1]
                                            + ix as usize];
                                        let wv =
                                            w[o * k + ((ci * g.kernel[0] + i) * g.kernel[1] + j)];
                                        want += xv as f64 * wv as f64;
                                    }
                                }
                            }
                            let row = &cols[((b * oh + y) * ow + z) * k..][..k];
                            let got: f64 = row
                                .iter()
                                .enumerate()
                                .map(|(r, &a)| a as f64 * w[o * k + g.weight_index(r)] as f64)
                                .sum();
                            assert_eq!(
                                got, want,
                                "{kernel:?} {strides:?} {auto_pad:?} at {b},{o},{y},{z}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn transpose_crosses_tiles_and_ragged_edges() {
        for (rows, cols) in [(1, 1), (3, 40), (37, 19), (16, 16), (33, 1)] {
            let x: Vec<u32> = (0..rows * cols).map(|v| v as u32).collect();
            let mut out = vec![u32::MAX; rows * cols];
            transpose(&x, rows, cols, &mut out);
            for r in 0..rows {
                for p in 0..cols {
                    assert_eq!(
                        out[p * rows + r],
                        x[r * cols + p],
                        "{rows}×{cols} at {r},{p}"
                    );
                }
            }
        }
    }

    #[test]
    fn same_padding_keeps_the_extent_over_the_stride() {
        let g = Geometry::new(1, &[3, 3], Some(&[2, 2]), None, None, AutoPad::SameUpper).unwrap();
        assert_eq!(g.out_len(0, 7), Some(4));
        assert_eq!(g.pads_of(0, 7), (1, 1));
        assert_eq!(g.pads_of(1, 8), (0, 1));
        let lower = Geometry {
            auto_pad: AutoPad::SameLower,
            ..g
        };
        assert_eq!(lower.pads_of(1, 8), (1, 0));
    }
}
