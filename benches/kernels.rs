//! Matrix-product kernel figures. Run with `cargo bench --bench kernels`; prints figures, asserts
//! nothing.
//!
//! For the matrix shapes of the zoo's transformer layers at batch 1 and a few sequence lengths, the
//! median time of one product and its rate in multiply-adds per second, for:
//! - `f32 (int8 decode)`: the f32 FMA kernels over an int8 per-column weight decoded panel by panel,
//!   from the copy re-laid in blocks of 32 columns that tract sessions hold (up to 3 rows, decoded
//!   into registers instead); `rows ×`: the same from the file's row-major codes, relative to it;
//!   `panels ×`: the blocked copy always through panels, relative to it;
//! - `f32 in limbs`: the same product on the integer kernels, activations split in three 8-bit limbs;
//! - `u8 × i8`: the exact integer product over activations already quantized (MatMulInteger);
//! - `4-bit (decode)` and `4-bit in limbs`: a MatMulNBits weight (4 bits, blocks of 32), decoded to f32
//!   panels, or multiplied on the integer kernels over limbs (AVX-512 VNNI only).
//!
//! - `vq2 (panels)` and `vq2 (broadcast)`: a codebook weight (4-value pieces, 256 entries, as the vq2
//!   recipe writes), decoded to f32 panels, or multiplied with each weight broadcast from the codebook
//!   (AVX-512 and AVX2, up to 96 rows);
//! - `vq2 (tables)`: the same weight by lookup-table accumulation (8 rows per table on AVX2, 16 on
//!   AVX-512; any rows; taken from 768 columns).
//!
//! `QUENCH_KERNELS=avx2|portable` caps the kernel families, as everywhere. Shapes given as arguments
//! (`cargo bench --bench kernels -- 384x1024x1024`) limit the run to those.

use std::time::Instant;

use quench::kernels::formats::{CodeSlice, Codebook, Int8Blocked, Int8Cols, NBits, NibblesK};
use quench::kernels::integer::{self, Acts, IntIsa, Packed, Weight, Zeros};
use quench::kernels::nibbles::{self, BlockNibbles};
use quench::kernels::{self, Isa, Panels};

/// The same weight without its few-rows kernel: every product goes through decoded panels.
struct PanelsOnly<'a>(&'a Int8Blocked);

impl Panels for PanelsOnly<'_> {
    fn k(&self) -> usize {
        self.0.k()
    }
    fn n(&self) -> usize {
        self.0.n()
    }
    fn decode(&self, k0: usize, kc: usize, n0: usize, nr: usize, out: &mut [f32]) {
        self.0.decode(k0, kc, n0, nr, out)
    }
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// Median seconds of `f` over enough runs to fill about 0.3 s.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    f();
    let once = start.elapsed().as_secs_f64().max(1e-7);
    let runs = ((0.3 / once) as usize).clamp(5, 2000);
    let mut v: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[runs / 2]
}

fn main() {
    // `cargo bench --bench kernels -- 48x1024x1024 384x1024x1024` measures only those shapes.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let isa = IntIsa::detect();
    println!(
        "kernels: f32 {}, integer {} (1 thread)",
        Isa::detect().name(),
        isa.name()
    );
    println!(
        "{:>16} {:>22} {:>7} {:>8} {:>22} {:>22} {:>8} {:>22} {:>22} {:>22} {:>22} {:>22}",
        "M×K×N",
        "f32 (int8 decode)",
        "rows ×",
        "panels ×",
        "f32 in limbs",
        "u8 × i8",
        "limbs ×",
        "4-bit (decode)",
        "4-bit in limbs",
        "vq2 (panels)",
        "vq2 (broadcast)",
        "vq2 (tables)"
    );
    for (m, k, n) in [
        (1, 256, 1024),
        (2, 256, 1024),
        (3, 256, 1024),
        (4, 256, 1024),
        (5, 256, 1024),
        (6, 256, 1024),
        (7, 256, 1024),
        (1, 1024, 8210),
        (1, 512, 2048),
        (2, 512, 2048),
        (8, 256, 1024),
        (48, 256, 256),
        (48, 256, 1024),
        (48, 1024, 256),
        (384, 256, 1024),
        (384, 1024, 256),
        (20, 1024, 8210),
        (20, 1024, 256),
        (20, 512, 2048),
        (24, 1024, 8210),
        (48, 1024, 1024),
        (48, 1024, 3072),
        (48, 3072, 1024),
        (96, 1024, 1024),
        (192, 1024, 1024),
        (384, 1024, 1024),
        (384, 1024, 3072),
        (160, 1024, 8210),
    ]
    .into_iter()
    .filter(|&(m, k, n)| only.is_empty() || only.contains(&format!("{m}x{k}x{n}")))
    {
        let a = values(m * k, 1);
        let w = values(k * n, 2);
        let q: Vec<i8> = w.iter().map(|&x| (x * 127.0).round() as i8).collect();
        let scales: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-5).collect();
        let mut c = vec![0f32; m * n];
        let cols = Int8Cols::new(&q, k, n, &scales, None);
        let t_rows = time(|| kernels::matmul(&a, m, &cols, &mut c));
        let blocked = Int8Blocked::from_cols(&cols);
        let t_f32 = time(|| kernels::matmul(&a, m, &blocked, &mut c));
        let t_panels = time(|| kernels::matmul(&a, m, &PanelsOnly(&blocked), &mut c));
        let layout = isa.layout();
        let data = integer::pack(Weight::I8(&q), k, n, layout);
        let b = Packed {
            data: &data,
            k,
            n,
            layout,
        };
        let sums = b.column_sums();
        let t_limbs = time(|| integer::matmul_f32(isa, &a, m, &b, &[], &sums, &scales, &mut c));
        let au: Vec<u8> = a.iter().map(|&x| (x * 127.0 + 128.0) as u8).collect();
        let mut ci = vec![0i32; m * n];
        let zeros = Zeros {
            a: 128,
            b: &[],
            column_sums: &sums,
        };
        let t_int = time(|| integer::matmul(isa, Acts::U8(&au), m, &b, zeros, &mut ci));
        let macs = (m * k * n) as f64;
        let cell = |t: f64| format!("{:>8.1} µs {:>6.1} G/s", t * 1e6, macs / t / 1e9);
        // 4-bit codes of W^T in blocks of 32, one scale per column and block.
        let nib: Vec<u8> = values(n * k / 2, 3)
            .iter()
            .map(|&x| ((x + 1.0) * 127.9) as u8)
            .collect();
        let block_scales: Vec<f32> = (0..n * k / 32)
            .map(|i| 0.01 + (i % 97) as f32 * 1e-4)
            .collect();
        let w4 = NBits::new(&nib, &block_scales, None, k, n, 4, 32).unwrap();
        let along_k = NibblesK::from_nbits(&w4).unwrap();
        let t_w4 = time(|| kernels::matmul(&a, m, &along_k, &mut c));
        let limbs4 = if nibbles::available() {
            let blocks = BlockNibbles::from_nbits(&w4).unwrap();
            cell(time(|| nibbles::matmul_f32(&a, m, &blocks, &mut c)))
        } else {
            "(no AVX-512 VNNI)".into()
        };
        let codes: Vec<u8> = values(n * k / 4, 4)
            .iter()
            .map(|&x| ((x + 1.0) * 127.9) as u8)
            .collect();
        let book = values(256 * 4, 5);
        let vq_scales: Vec<f32> = (0..n).map(|j| 0.5 + j as f32 * 1e-4).collect();
        let vq = Codebook {
            stages: vec![(CodeSlice::U8(&codes), &book[..])],
            scales: &vq_scales,
            k,
            n,
            k_padded: k,
            dim: 4,
            subspaces: 1,
            size: 0,
        };
        let t_vq = time(|| kernels::matmul(&a, m, &vq, &mut c));
        let vq_broadcast = if kernels::codebook::matmul(&a, m, &vq, &mut c) {
            cell(time(|| {
                kernels::codebook::matmul(&a, m, &vq, &mut c);
            }))
        } else {
            "(not taken)".into()
        };
        let vq_tables = if kernels::lut::product(&a, m, &vq, &mut c) {
            cell(time(|| {
                kernels::lut::product(&a, m, &vq, &mut c);
            }))
        } else {
            "(not taken)".into()
        };
        println!(
            "{:>16} {:>22} {:>7.2} {:>8.2} {:>22} {:>22} {:>8.2} {:>22} {:>22} {:>22} {:>22} {:>22}",
            format!("{m}×{k}×{n}"),
            cell(t_f32),
            t_rows / t_f32,
            t_panels / t_f32,
            cell(t_limbs),
            cell(t_int),
            t_limbs / t_f32,
            cell(t_w4),
            limbs4,
            cell(t_vq),
            vq_broadcast,
            vq_tables
        );
    }
}
