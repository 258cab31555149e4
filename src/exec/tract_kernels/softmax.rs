//! Softmax over an axis that is not the innermost one.
//!
//! tract's optimiser moves axes to suit the products around a softmax: in an attention block it may
//! keep the heads innermost, and the softmax then runs over a middle axis (rxnmap: `[1, T, T, 16]`,
//! axis 2). tract's `Softmax` evaluates such an axis through an ndarray view per row, collapsed
//! axis by axis, with scalar `exp`: on rxnmap at 48 tokens its 16 softmaxes took 38 % of the fp32
//! run (8 ms each for 37 k values; that iteration, and libm's SSE code slowed by the AVX-512 state
//! tract's kernels leave, see `kernels::zero_upper`). `QuenchSoftmax` takes those nodes in the
//! optimised plan and does the same arithmetic in the same order (the max, `x − max`, the sum of
//! `exp` in axis order, then `exp(x − max) / sum`, or `x − max − ln sum` for LogSoftmax), for all
//! the rows of a block side by side, so every step but `exp` runs along contiguous values: the
//! values are tract's, bit for bit.

use super::*;

use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

pub(super) const OP: &str = "QuenchSoftmax";

/// Replaces each f32 softmax of the optimised `model` whose axes are consecutive and followed by
/// axes holding more than one value (the rows tract walks through strided views) with
/// [`QSoftmax`]; returns how many.
pub fn replace_strided(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    for id in 0..model.nodes.len() {
        let Some(sm) = model.nodes[id].op_as::<Softmax>() else {
            continue;
        };
        let mut axes = sm.axes.to_vec();
        axes.sort_unstable();
        let fact = model.outlet_fact(model.nodes[id].inputs[0])?;
        let consecutive = axes.windows(2).all(|w| w[1] == w[0] + 1);
        // Values per row step: with 1, tract's rows are contiguous and it runs its vector kernels.
        let inner = axes.last().and_then(|&a| {
            fact.shape
                .iter()
                .skip(a + 1)
                .try_fold(1usize, |n, d| Some(n * d.to_usize().ok()?))
        });
        let taken = sm.quant_output_dt.is_none()
            && fact.datum_type == f32::datum_type()
            && consecutive
            && inner.is_some_and(|n| n > 1);
        if taken {
            let kind = sm.kind;
            model.nodes[id].op = Box::new(QSoftmax {
                first: axes[0],
                last: axes[axes.len() - 1],
                kind,
            });
            done += 1;
        }
    }
    Ok(done)
}

/// Softmax (or LogSoftmax) over the axes `first..=last` of an f32 tensor with axes after them.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct QSoftmax {
    first: usize,
    last: usize,
    kind: SoftmaxKind,
}

impl Op for QSoftmax {
    fn name(&self) -> StaticName {
        OP.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{:?} over axes {}..={}",
            self.kind, self.first, self.last
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for QSoftmax {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = &inputs[0];
        let shape = x.shape();
        ensure!(
            self.last < shape.len(),
            "{OP}: axes up to {} of a rank-{} input",
            self.last,
            shape.len()
        );
        let len: usize = shape[self.first..=self.last].iter().product();
        let inner: usize = shape[self.last + 1..].iter().product();
        let mut y = Tensor::zero::<f32>(shape)?;
        if len == 0 || inner == 0 {
            return Ok(tvec![y.into_tvalue()]);
        }
        // libm's `exp` is SSE code (see `kernels::zero_upper`).
        kernels::zero_upper();
        {
            let x_ram = x.try_as_plain_ram()?;
            let mut y_ram = y.try_as_plain_ram_mut()?;
            let mut max = vec![0f32; inner];
            let mut sum = vec![0f32; inner];
            let blocks = x_ram
                .as_slice::<f32>()?
                .chunks_exact(len * inner)
                .zip(y_ram.as_slice_mut::<f32>()?.chunks_exact_mut(len * inner));
            for (src, dst) in blocks {
                softmax_lanes(src, dst, inner, &mut max, &mut sum, self.kind);
            }
        }
        Ok(tvec![y.into_tvalue()])
    }
}

/// Below this, `exp` rounds to +0 in f32 (`e⁻¹⁰⁵` is under a third of half the least subnormal,
/// `2⁻¹⁵⁰`), which libm reaches through its underflow path: a product of two tiny values to raise
/// the underflow flag, over a hundred cycles of microcode on Intel. An attention mask of large
/// negative scores sends most of a row there.
const EXP_ZERO_BELOW: f32 = -105.0;

/// `x.exp()`, the same value, without libm's underflow path where the result is +0.
fn exp(x: f32) -> f32 {
    if x < EXP_ZERO_BELOW { 0.0 } else { x.exp() }
}

/// tract's softmax off its fast path (`softmax_inner` in tract-core 0.23.9), for the `inner` rows
/// of a `[len, inner]` block side by side (row `l` is column `l`), operation for operation: the max
/// as `Iterator::max_by` over `partial_cmp` (unordered counting as less: a value replaces the max
/// unless the max is greater), `x − max`, the `exp` sum in axis order, then `exp(x − max) / sum` or
/// `x − max − ln sum`.
fn softmax_lanes(
    src: &[f32],
    dst: &mut [f32],
    inner: usize,
    max: &mut [f32],
    sum: &mut [f32],
    kind: SoftmaxKind,
) {
    max.copy_from_slice(&src[..inner]);
    for row in src.chunks_exact(inner).skip(1) {
        for (m, &x) in max.iter_mut().zip(row) {
            if (*m).partial_cmp(&x) != Some(std::cmp::Ordering::Greater) {
                *m = x;
            }
        }
    }
    // Iterator::sum starts at −0.0; every term here is +0 or more (or NaN), so the first sum is the
    // first term either way.
    sum.fill(-0.0);
    match kind {
        SoftmaxKind::Softmax => {
            for (d, s) in dst.chunks_exact_mut(inner).zip(src.chunks_exact(inner)) {
                for (((d, &x), m), acc) in d.iter_mut().zip(s).zip(&*max).zip(&mut *sum) {
                    *d = exp(x - m);
                    *acc += *d;
                }
            }
            for d in dst.chunks_exact_mut(inner) {
                for (d, s) in d.iter_mut().zip(&*sum) {
                    *d /= s;
                }
            }
        }
        SoftmaxKind::LogSoftmax => {
            for (d, s) in dst.chunks_exact_mut(inner).zip(src.chunks_exact(inner)) {
                for (((d, &x), m), acc) in d.iter_mut().zip(s).zip(&*max).zip(&mut *sum) {
                    *d = x - m;
                    *acc += exp(*d);
                }
            }
            sum.iter_mut().for_each(|s| *s = s.ln());
            for d in dst.chunks_exact_mut(inner) {
                for (d, s) in d.iter_mut().zip(&*sum) {
                    *d -= s;
                }
            }
        }
    }
}

impl TypedOp for QSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].datum_type == f32::datum_type(),
            "{OP} takes f32 input"
        );
        Ok(tvec![inputs[0].without_value()])
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::{Rng, SeedableRng};

    fn softmax_model(shape: &[usize], axes: &[usize], kind: SoftmaxKind) -> TypedModel {
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact(shape)).unwrap();
        let op = Softmax::new(axes.into(), None, kind);
        let y = m.wire_node("softmax", op, &[x]).unwrap();
        m.select_output_outlets(&y).unwrap();
        m
    }

    fn run(m: TypedModel, x: &Tensor) -> Vec<u32> {
        let y = m
            .into_runnable()
            .unwrap()
            .run(tvec![x.clone().into_tvalue()])
            .unwrap();
        let y = y[0].try_as_plain_ram().unwrap();
        y.as_slice::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn strided_softmax_is_tracts_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let cases: [(&[usize], &[usize], SoftmaxKind, bool); 6] = [
            (&[2, 5, 3, 7], &[1], SoftmaxKind::Softmax, true),
            (&[2, 5, 3, 7], &[1, 2], SoftmaxKind::Softmax, true),
            (&[1, 48, 48, 16], &[2], SoftmaxKind::Softmax, true),
            (&[3, 9, 4], &[1], SoftmaxKind::LogSoftmax, true),
            // Innermost, or followed by axes of one value: tract's contiguous rows, kept.
            (&[2, 5, 3, 7], &[3], SoftmaxKind::Softmax, false),
            (&[2, 5, 1], &[1], SoftmaxKind::Softmax, false),
        ];
        for (shape, axes, kind, taken) in cases {
            let len: usize = shape.iter().product();
            let values: Vec<f32> = (0..len)
                .map(|i| match i % 29 {
                    // A mask, scores far below the rest (exp rounds to 0), and one unordered value.
                    3 => f32::NEG_INFINITY,
                    7 => -250.0,
                    11 => -90.0,
                    _ if i == 17 => f32::NAN,
                    _ => (rng.next_u32() as f32 / u32::MAX as f32 - 0.5) * 12.0,
                })
                .collect();
            let x = Tensor::from_shape(shape, &values).unwrap();
            let m = softmax_model(shape, axes, kind);
            let want = run(m.clone(), &x);
            let mut q = m;
            assert_eq!(
                replace_strided(&mut q).unwrap(),
                usize::from(taken),
                "{shape:?} {axes:?}"
            );
            assert_eq!(run(q, &x), want, "{shape:?} over {axes:?}, {kind:?}");
        }
    }
}
