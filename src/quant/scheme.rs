//! A complete weight scheme (format, width, granularity, clip search, double quantization, dead zone,
//! outliers) and [`encode`]: one `[channels, k]` matrix → codes, the level each code stands for, one
//! scale (and zero point) per group, and the outliers kept exactly. Every graph form a pass emits starts
//! from an [`Encoded`], and [`Encoded::decode`] is the reference for what that form must compute.
//!
//! Decoding: `w[i] = (levels[codes[i]] − zero_point[g]) · scale[g]`, where g is the group of i, and then
//! `w[i] = v` for every kept outlier (i, v) — the dense part holds an exact 0 there.

use serde::Serialize;

use super::int::{self, Granularity, IntScheme};
use super::sparse::{self, OutlierRule};
use super::table::{self, DoubleQuantized, TableFormat};
use super::vq::VqScheme;

/// How values are mapped to codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Uniform integer levels with a scale (and zero point when asymmetric).
    Int,
    /// NormalFloat4 levels with blockwise absmax scaling.
    Nf4,
    /// FP4 (E2M1) levels with blockwise absmax scaling.
    Fp4,
    /// Vector quantization: k-means codebooks over pieces of the rows ([`super::vq`]); the
    /// parameters are in [`WeightScheme::vq`].
    Vq,
}

/// Values near zero forced to exactly zero.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadZone {
    /// Half-width of the zone in quantization steps of each group (0.5 is plain rounding).
    Width(f32),
    /// The magnitude quantile of the tensor that makes this fraction of the values zero.
    Sparsity(f64),
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct WeightScheme {
    pub format: Format,
    pub bits: u32,
    pub symmetric: bool,
    pub granularity: Granularity,
    pub clip_search: bool,
    /// Quantize the group scales to 8 bits in groups of [`DOUBLE_QUANT_GROUP`].
    pub double_quant: bool,
    /// Choose codes by error-compensating rounding against the calibration Hessian of the layer's
    /// input ([`super::gptq`]; for vq, [`super::vq_feedback`], which refits codebooks and scales
    /// too) where calibration data reaches the weight; round to nearest otherwise.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub gptq: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_zone: Option<DeadZone>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outliers: Option<OutlierRule>,
    /// The codebook parameters of format `vq` (its outlier rule is `outliers` above).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vq: Option<VqScheme>,
}

/// Scales per second-level group under double quantization (bitsandbytes uses 256).
pub const DOUBLE_QUANT_GROUP: usize = 256;

impl WeightScheme {
    /// A plain integer scheme.
    pub fn int(bits: u32, symmetric: bool, granularity: Granularity, clip_search: bool) -> Self {
        WeightScheme {
            format: Format::Int,
            bits,
            symmetric,
            granularity,
            clip_search,
            double_quant: false,
            gptq: false,
            dead_zone: None,
            outliers: None,
            vq: None,
        }
    }

    /// A vector-quantization scheme.
    pub fn vq(vq: VqScheme) -> Self {
        WeightScheme {
            format: Format::Vq,
            bits: 8,
            symmetric: true,
            granularity: Granularity::PerChannel,
            clip_search: false,
            double_quant: false,
            gptq: false,
            dead_zone: None,
            outliers: vq.outliers,
            vq: Some(vq),
        }
    }

    /// The VQ parameters (with this scheme's outlier rule) of a `vq` scheme.
    pub fn vq_scheme(&self) -> Option<VqScheme> {
        self.vq
            .filter(|_| self.format == Format::Vq)
            .map(|v| VqScheme {
                outliers: self.outliers,
                ..v
            })
    }

    pub fn int_scheme(&self) -> IntScheme {
        IntScheme {
            bits: self.bits,
            symmetric: self.symmetric,
            granularity: self.granularity,
            clip_search: self.clip_search,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.format == Format::Vq {
            if self.dead_zone.is_some() || self.double_quant {
                return Err("dead_zone and double_quant apply to scalar formats, not vq".into());
            }
            if self.gptq && self.outliers.is_some() {
                return Err("gptq on vq does not take outliers: use one".into());
            }
            return match self.vq_scheme() {
                Some(v) => v.validate(),
                None => Err("format vq needs its codebook parameters".into()),
            };
        }
        self.int_scheme().validate()?;
        if self.format != Format::Int {
            if self.bits != 4 {
                return Err(format!(
                    "format {:?} is 4-bit, bits {} given",
                    self.format, self.bits
                ));
            }
            if !self.symmetric {
                return Err(format!(
                    "format {:?} scales by absmax and has no zero point: use symmetric",
                    self.format
                ));
            }
            if self.dead_zone.is_some() {
                return Err("dead_zone applies to format int".into());
            }
        }
        if self.gptq && self.dead_zone.is_some() {
            return Err("gptq re-chooses codes and would undo a dead_zone: use one".into());
        }
        if self.gptq && self.granularity == Granularity::PerTensor {
            return Err("gptq needs per-channel or block scales".into());
        }
        match self.dead_zone {
            Some(DeadZone::Width(w)) if !(w.is_finite() && w >= 0.0) => {
                return Err(format!("dead_zone width must be ≥ 0, got {w}"));
            }
            Some(DeadZone::Sparsity(s)) if !(0.0..1.0).contains(&s) => {
                return Err(format!("dead_zone sparsity must be in [0, 1), got {s}"));
            }
            _ => {}
        }
        self.outliers.map_or(Ok(()), |o| o.validate())
    }

    /// A short human label, e.g. `int4 block 32 sym clip` or `nf4 block 64 dq`.
    pub fn label(&self) -> String {
        if let Some(v) = self.vq_scheme() {
            return v.label() + if self.gptq { " gptq" } else { "" };
        }
        let mut s = match self.format {
            Format::Int => format!("int{}", self.bits),
            Format::Nf4 => "nf4".into(),
            Format::Fp4 => "fp4".into(),
            Format::Vq => "vq".into(),
        };
        s += &match self.granularity {
            Granularity::PerTensor => " per-tensor".to_string(),
            Granularity::PerChannel => " per-channel".to_string(),
            Granularity::Block(b) => format!(" block {b}"),
        };
        if self.format == Format::Int && !self.symmetric {
            s += " asym";
        }
        if self.clip_search {
            s += " clip";
        }
        if self.double_quant {
            s += " dq";
        }
        if self.gptq {
            s += " gptq";
        }
        match self.dead_zone {
            Some(DeadZone::Width(w)) => s += &format!(" deadzone {w}"),
            Some(DeadZone::Sparsity(f)) => s += &format!(" sparsity {f}"),
            None => {}
        }
        match self.outliers {
            Some(OutlierRule::TopFraction(f)) => s += &format!(" outliers {f}"),
            Some(OutlierRule::StdThreshold(t)) => s += &format!(" outliers {t}σ"),
            None => {}
        }
        s
    }
}

/// A matrix in codes: see the module docs for how it decodes.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub channels: usize,
    pub k: usize,
    /// Values per scale along k (the last group of a row may be short).
    pub group: usize,
    /// How codes map to levels (`Int`: consecutive integers).
    pub format: Format,
    /// Code width: `levels` has `2^bits` entries.
    pub bits: u32,
    /// Row-major `[channels, k]` indices into `levels`.
    pub codes: Vec<u8>,
    pub levels: Vec<f32>,
    /// One per group, `[channels, groups per row]` (already through double quantization, if any).
    pub scales: Vec<f32>,
    /// One per group, in level units (asymmetric integers only).
    pub zero_points: Option<Vec<u8>>,
    /// The 8-bit form of `scales` under double quantization.
    pub double: Option<DoubleQuantized>,
    /// (flat index, exact value), ascending.
    pub outliers: Vec<(usize, f32)>,
    /// Fraction of the decoded values that are exactly zero.
    pub sparsity: f64,
    /// Weight SQNR of the decode against the original, dB.
    pub sqnr_db: f64,
}

impl Encoded {
    pub fn groups_per_row(&self) -> usize {
        self.k.div_ceil(self.group)
    }

    /// Sets `sparsity` and `sqnr_db` from the decode against the original `w`.
    fn measure(&mut self, w: &[f32]) {
        let (mut zeros, mut signal, mut noise) = (0usize, 0f64, 0f64);
        self.for_each_decoded(|i, v| {
            zeros += usize::from(v == 0.0);
            signal += (w[i] as f64).powi(2);
            noise += ((w[i] - v) as f64).powi(2);
        });
        self.sparsity = zeros as f64 / w.len().max(1) as f64;
        self.sqnr_db = if noise == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (signal / noise).log10()
        };
    }

    /// Re-chooses every code by error-compensating rounding against the calibration Hessian `h` of
    /// the rows' columns ([`super::gptq`]); scales, zero points and levels stay, and a kept outlier
    /// stores the value its weight had when its turn came (its error is zero and compensates the
    /// rounding before it). `w` is the matrix this was encoded from. Returns the damping used.
    pub fn refine_with_feedback(
        &mut self,
        w: &[f32],
        h: &super::gptq::Hessian,
        damp: f64,
    ) -> Result<f64, String> {
        if self.channels == 1 && h.k != self.k {
            return Err("error feedback needs the weight's rows: not per tensor".into());
        }
        let outliers: std::collections::HashSet<usize> =
            self.outliers.iter().map(|&(i, _)| i).collect();
        let (gpr, k) = (self.groups_per_row(), self.k.max(1));
        let integer = self.format == Format::Int;
        let r = {
            let e = &*self;
            super::gptq::round_with_feedback(w, e.channels, e.k, h, damp, |i, v| {
                if outliers.contains(&i) {
                    return (e.codes[i] as i32, v);
                }
                let g = (i / k) * gpr + (i % k) / e.group;
                let z = e.zero_points.as_ref().map_or(0.0, |z| z[g] as f32);
                let s = e.scales[g];
                if s == 0.0 {
                    return (e.codes[i] as i32, (e.levels[e.codes[i] as usize] - z) * s);
                }
                let t = v / s + z;
                let c = if integer {
                    // Consecutive integer levels.
                    (t.round() - e.levels[0]).clamp(0.0, (e.levels.len() - 1) as f32) as usize
                } else {
                    let mut best = 0;
                    for (j, &l) in e.levels.iter().enumerate() {
                        if (l - t).abs() < (e.levels[best] - t).abs() {
                            best = j;
                        }
                    }
                    best
                };
                (c as i32, (e.levels[c] - z) * s)
            })?
        };
        self.codes = r.codes.iter().map(|&c| c as u8).collect();
        for (i, v) in self.outliers.iter_mut() {
            *v = r.compensated[*i];
        }
        self.measure(w);
        Ok(r.damping)
    }

    pub fn decode(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.codes.len());
        self.for_each_decoded(|_, v| out.push(v));
        out
    }

    /// Calls `f(i, value)` for every decoded value in order, without materialising the matrix.
    pub fn for_each_decoded(&self, mut f: impl FnMut(usize, f32)) {
        let gpr = self.groups_per_row();
        let mut outliers = self.outliers.iter().peekable();
        for r in 0..self.channels {
            for c in 0..self.k {
                let i = r * self.k + c;
                let v = match outliers.peek() {
                    Some(&&(j, v)) if j == i => {
                        outliers.next();
                        v
                    }
                    _ => {
                        let g = r * gpr + c / self.group;
                        let z = self.zero_points.as_ref().map_or(0.0, |z| z[g] as f32);
                        (self.levels[self.codes[i] as usize] - z) * self.scales[g]
                    }
                };
                f(i, v);
            }
        }
    }

    /// Bytes of this encoding when codes are packed at `slot_bits` per code: codes, scales (f32, or u8
    /// plus two f32 per second-level group), zero points (u8), outliers (i64 index + f32 value).
    pub fn bytes(&self, slot_bits: u32) -> u64 {
        let codes = (self.codes.len() as u64 * slot_bits as u64).div_ceil(8);
        let scales = match &self.double {
            Some(d) => d.codes.len() as u64 + 8 * d.mins.len() as u64,
            None => 4 * self.scales.len() as u64,
        };
        let zps = self.zero_points.as_ref().map_or(0, |z| z.len() as u64);
        codes + scales + zps + 12 * self.outliers.len() as u64
    }
}

/// Encodes a row-major `[channels, k]` matrix. Per-tensor schemes treat the matrix as one row.
pub fn encode(
    w: &[f32],
    channels: usize,
    k: usize,
    scheme: &WeightScheme,
) -> Result<Encoded, String> {
    scheme.validate()?;
    if scheme.format == Format::Vq {
        return Err("format vq encodes through quant::vq::encode".into());
    }
    if w.len() != channels * k {
        return Err(format!("{} values for a [{channels}, {k}] matrix", w.len()));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(format!("value {i} is not finite ({})", w[i]));
    }
    let (channels, k) = if scheme.granularity == Granularity::PerTensor {
        (1, channels * k)
    } else {
        (channels, k)
    };
    let group = match scheme.granularity {
        Granularity::Block(b) => b.min(k.max(1)),
        _ => k.max(1),
    };
    let split = scheme
        .outliers
        .map(|rule| sparse::split_outliers(w, channels, k, rule));
    let dense: &[f32] = split.as_ref().map_or(w, |s| &s.dense);
    let double = |scales: &[f32]| {
        scheme
            .double_quant
            .then(|| table::double_quantize(scales, DOUBLE_QUANT_GROUP))
    };
    let (codes, levels, scales, zero_points, double) = match scheme.format {
        Format::Int => {
            let is = IntScheme {
                granularity: if scheme.granularity == Granularity::PerTensor {
                    Granularity::PerChannel
                } else {
                    scheme.granularity
                },
                ..scheme.int_scheme()
            };
            let mut q = int::quantize(dense, channels, k, &is)?;
            let dq = double(&q.scales);
            if let Some(d) = &dq {
                q.scales = d.dequantize();
                q.codes = int::codes_for_scales(dense, &q);
            }
            match scheme.dead_zone {
                Some(DeadZone::Width(wd)) => {
                    sparse::apply_dead_zone_by(dense, &mut q, |s| wd * s);
                }
                Some(DeadZone::Sparsity(f)) => {
                    let t = sparse::threshold_for_sparsity(dense, f);
                    sparse::apply_dead_zone(dense, &mut q, t);
                }
                None => {}
            }
            let qmin = is.qmin();
            let codes: Vec<u8> = q.codes.iter().map(|&c| (c - qmin) as u8).collect();
            let levels: Vec<f32> = (is.qmin()..=is.qmax()).map(|v| v as f32).collect();
            let zps = q
                .zero_points
                .map(|z| z.iter().map(|&v| v as u8).collect::<Vec<u8>>());
            (codes, levels, q.scales, zps, dq)
        }
        Format::Vq => unreachable!("refused above"),
        Format::Nf4 | Format::Fp4 => {
            let tf = if scheme.format == Format::Nf4 {
                TableFormat::Nf4
            } else {
                TableFormat::Fp4
            };
            let mut t = table::quantize(dense, channels, k, group, tf, scheme.clip_search)?;
            let dq = double(&t.scales);
            if let Some(d) = &dq {
                t.requantize_with(dense, d.dequantize());
            }
            (t.codes, tf.table().to_vec(), t.scales, None, dq)
        }
    };
    let mut e = Encoded {
        channels,
        k,
        group,
        format: scheme.format,
        bits: if scheme.format == Format::Int {
            scheme.bits
        } else {
            4
        },
        codes,
        levels,
        scales,
        zero_points,
        double,
        outliers: split.map(|s| s.outliers).unwrap_or_default(),
        sparsity: 0.0,
        sqnr_db: 0.0,
    };
    e.measure(w);
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(n: usize) -> Vec<f32> {
        let mut s = 7u64;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                (u - 0.5) * (1.0 + 3.0 * u * u)
            })
            .collect()
    }

    #[test]
    fn int_encoding_decodes_like_the_integer_quantizer() {
        let w = weights(64 * 96);
        for (sym, g) in [
            (true, Granularity::Block(32)),
            (false, Granularity::Block(16)),
            (true, Granularity::PerChannel),
            (false, Granularity::PerTensor),
        ] {
            let s = WeightScheme::int(4, sym, g, true);
            let e = encode(&w, 64, 96, &s).unwrap();
            let q = int::quantize(&w, 64, 96, &s.int_scheme()).unwrap();
            assert_eq!(e.decode(), q.dequantize(), "{}", s.label());
            assert_eq!(e.levels.len(), 16);
        }
    }

    #[test]
    fn double_quant_costs_little_and_saves_scale_bytes() {
        let w = weights(256 * 256);
        let mut s = WeightScheme::int(4, true, Granularity::Block(32), false);
        s.format = Format::Nf4;
        let plain = encode(&w, 256, 256, &s).unwrap();
        s.double_quant = true;
        let dq = encode(&w, 256, 256, &s).unwrap();
        assert!(
            dq.sqnr_db > plain.sqnr_db - 0.5,
            "{} vs {}",
            dq.sqnr_db,
            plain.sqnr_db
        );
        // 4.125 bits per weight (32-value blocks, f32 scales) vs ≈ 4.26 → 4.25 + 1/32·(1/256·64)…
        let (a, b) = (plain.bytes(4), dq.bytes(4));
        assert!(b < a, "{b} ≥ {a}");
        assert_eq!(a, 256 * 256 / 2 + 4 * 256 * 8);
        assert_eq!(b, 256 * 256 / 2 + 256 * 8 + 8 * (256 * 8 / 256));
    }

    #[test]
    fn outliers_and_dead_zone_show_in_the_decode() {
        let mut w = weights(32 * 64);
        w[10] = 50.0;
        let mut s = WeightScheme::int(4, true, Granularity::PerChannel, false);
        s.outliers = Some(OutlierRule::StdThreshold(6.0));
        let e = encode(&w, 32, 64, &s).unwrap();
        assert_eq!(e.outliers, vec![(10, 50.0)]);
        assert_eq!(e.decode()[10], 50.0);
        let plain = encode(
            &w,
            32,
            64,
            &WeightScheme::int(4, true, Granularity::PerChannel, false),
        )
        .unwrap();
        // In the outlier's row the other values are no longer crushed to zero.
        let row = |d: Vec<f32>| int::sqnr_db(&w[..64], &d[..64]);
        let (a, b) = (row(plain.decode()), row(e.decode()));
        assert!(b > a + 10.0, "{a} → {b} dB");

        let mut s = WeightScheme::int(4, true, Granularity::PerChannel, false);
        s.dead_zone = Some(DeadZone::Sparsity(0.4));
        let e = encode(&w, 32, 64, &s).unwrap();
        assert!((e.sparsity - 0.4).abs() < 0.03, "{}", e.sparsity);
        s.dead_zone = Some(DeadZone::Width(1.5));
        let wide = encode(&w, 32, 64, &s).unwrap();
        assert!(wide.sparsity > plain.sparsity);
    }

    #[test]
    fn invalid_schemes_say_why() {
        let mut s = WeightScheme::int(3, true, Granularity::Block(32), false);
        s.format = Format::Nf4;
        assert!(s.validate().unwrap_err().contains("4-bit"));
        s.bits = 4;
        s.dead_zone = Some(DeadZone::Width(1.0));
        assert!(s.validate().unwrap_err().contains("dead_zone"));
    }
}
