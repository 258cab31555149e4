//! quench's tract kernels for compressed weights, end to end: zoo models quantized with the w8, w4, vq2
//! and dynamic recipes for the tract target run with the kernels (weights kept compressed) and with
//! tract's own operators on the same graph; the outputs agree to float rounding (exactly, for the
//! integer products of the dynamic form), and the weight products were really taken over by the
//! kernels.

mod common;

use common::*;
use quench::Model;
use quench::exec::inputs::{self, InputOptions, Source};
use quench::exec::{self, Prepared, RuntimeKind, SessionOptions};

#[test]
fn kernels_reproduce_tracts_own_operators_on_quantized_zoo_models() {
    for zoo_name in ["rxnmap", "magika"] {
        let Some(_) = zoo_model(zoo_name) else {
            return;
        };
        let dir = tempdir();
        for recipe in ["w8", "w4", "vq2", "dynamic"] {
            let out = dir.path().join(format!("{zoo_name}.{recipe}.onnx"));
            let o = quench(&[
                "quantize",
                &format!("zoo:{zoo_name}"),
                "--recipe",
                recipe,
                "--target",
                "tract",
                "-o",
                out.to_str().unwrap(),
            ]);
            assert!(o.status.success(), "{}", stderr_of(&o));
            let model = Model::load(&out).unwrap();
            let prep = Prepared::from_model(&model, recipe);
            let opts = InputOptions {
                spec: zoo_spec(zoo_name),
                seed: 5,
                ..Default::default()
            };
            let plain_opts = SessionOptions {
                tract_kernels: false,
                ..Default::default()
            };
            let mut fast =
                exec::open(&prep, RuntimeKind::Tract, &SessionOptions::default()).unwrap();
            let mut plain = exec::open(&prep, RuntimeKind::Tract, &plain_opts).unwrap();
            let kernels = fast
                .settings()
                .into_iter()
                .find(|(k, _)| k == "weight kernels")
                .map(|(_, v)| v)
                .unwrap();
            // Every weight MatMul of these models is one of the forms the kernels take.
            let taken = if recipe == "dynamic" {
                !kernels.contains("(0 MatMulInteger") && !kernels.contains(", 0 DynamicQuantize")
            } else {
                !kernels.contains("(0 int8, 0 MatMulNBits, 0 codebook")
            };
            assert!(
                kernels.starts_with("quench") && taken,
                "{zoo_name} {recipe}: {kernels}"
            );
            let set = inputs::open(&Source::Random { count: 2 }, &prep.inputs, &opts).unwrap();
            for batch in set {
                let batch = batch.unwrap();
                let a = fast.run(&batch).unwrap();
                let b = plain.run(&batch).unwrap();
                for ((name, x), (_, y)) in a.iter().zip(&b) {
                    let (x, y) = (x.to_f32(), y.to_f32());
                    let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                    let worst = x
                        .iter()
                        .zip(y.iter())
                        .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                    // tract's MatMulNBits rounds scales to f16 (see docs/tract-kernels.md); the
                    // kernels use the f32 scales the file holds, so w4 differs by that rounding.
                    // The integer products are exact and the quantizer is tract's arithmetic.
                    let tol = match recipe {
                        "w4" => 2e-2,
                        "dynamic" => 0.0,
                        _ => 1e-4,
                    };
                    assert!(
                        worst <= tol * scale,
                        "{zoo_name} {recipe} {name}: max difference {worst} (output scale {scale})"
                    );
                }
            }
        }
    }
}
