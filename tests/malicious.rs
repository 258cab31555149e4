//! Malformed and hostile models: each one is refused with a clear error naming what is wrong and where,
//! never a panic, a huge allocation or a read outside the model's folder.

mod common;

use std::path::Path;

use bytes::Bytes;
use prost::Message;
use quench::Model;
use quench::onnx::pb::attribute_proto::AttributeType;
use quench::onnx::pb::tensor_proto::DataLocation;
use quench::onnx::pb::*;

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn model(
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    inputs: &[&str],
    outputs: &[&str],
) -> ModelProto {
    common::model_of(GraphProto {
        name: Some("g".into()),
        node: nodes,
        initializer: inits,
        input: inputs.iter().map(|n| common::value_info(n, 1)).collect(),
        output: outputs.iter().map(|n| common::value_info(n, 1)).collect(),
        ..Default::default()
    })
}

fn external(name: &str, location: &str, offset: u64, length: u64) -> TensorProto {
    let e = |k: &str, v: String| StringStringEntryProto {
        key: k.into(),
        value: v,
    };
    TensorProto {
        name: name.into(),
        dims: vec![4],
        data_type: 1,
        data_location: DataLocation::External as i32,
        external_data: vec![
            e("location", location.into()),
            e("offset", offset.to_string()),
            e("length", length.to_string()),
        ],
        ..Default::default()
    }
}

/// An Add of the input with a weight, the weight given by `w`.
fn with_weight(w: TensorProto) -> ModelProto {
    model(
        vec![node("Add", "add", &["x", "w"], &["y"])],
        vec![w],
        &["x"],
        &["y"],
    )
}

/// A float initializer holding `v`.
fn f32s(name: &str, v: &[f32]) -> TensorProto {
    common::raw_tensor(
        name,
        1,
        &[v.len() as i64],
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}

/// The error tract's session gives a model of graph `g`, which it must refuse.
fn tract_refusal(g: GraphProto) -> String {
    use quench::exec::{self, Prepared, RuntimeKind, SessionOptions};
    let model = Model::from_proto(common::model_of(g), vec![]).unwrap();
    let prep = Prepared::from_model(&model, "m");
    let err = exec::open(&prep, RuntimeKind::Tract, &SessionOptions::default())
        .err()
        .expect("refused");
    format!("{err:#}")
}

fn load_error(dir: &Path, m: &ModelProto) -> String {
    let path = dir.join("model.onnx");
    std::fs::write(&path, m.encode_to_vec()).unwrap();
    match Model::load(&path) {
        Ok(_) => panic!("the model loaded"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("model.onnx"),
                "the error does not name the file: {msg}"
            );
            msg
        }
    }
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "expected '{p}' in: {msg}");
    }
}

#[test]
fn external_data_outside_the_folder_is_refused() {
    let root = common::tempdir();
    let dir = root.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(root.path().join("secret.bin"), [0u8; 16]).unwrap();
    let e = load_error(&dir, &with_weight(external("w", "../secret.bin", 0, 16)));
    assert_contains(&e, &["'w'", "../secret.bin", "leaves the model's folder"]);
    let e = load_error(
        &dir,
        &with_weight(external("w", "sub/../../secret.bin", 0, 16)),
    );
    assert_contains(&e, &["leaves the model's folder"]);
    let abs = root.path().join("secret.bin").display().to_string();
    let e = load_error(&dir, &with_weight(external("w", &abs, 0, 16)));
    assert_contains(&e, &["'w'", "absolute path"]);
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(root.path().join("secret.bin"), dir.join("link.bin")).unwrap();
        let e = load_error(&dir, &with_weight(external("w", "link.bin", 0, 16)));
        assert_contains(&e, &["'w'", "link.bin", "outside the model's folder"]);
    }
}

#[test]
fn external_data_ranges_are_checked() {
    let dir = common::tempdir();
    std::fs::write(dir.path().join("w.bin"), [0u8; 16]).unwrap();
    let e = load_error(dir.path(), &with_weight(external("w", "w.bin", 8, 16)));
    assert_contains(&e, &["'w'", "offset 8 + length 16", "16 bytes"]);
    let e = load_error(
        dir.path(),
        &with_weight(external("w", "w.bin", u64::MAX, 16)),
    );
    assert_contains(&e, &["runs past the end"]);
    let e = load_error(
        dir.path(),
        &with_weight(external("w", "missing.bin", 0, 16)),
    );
    assert_contains(&e, &["missing.bin"]);
    // A valid range loads, mapped from the file.
    let path = dir.path().join("ok.onnx");
    std::fs::write(
        &path,
        with_weight(external("w", "w.bin", 0, 16)).encode_to_vec(),
    )
    .unwrap();
    let m = Model::load(&path).unwrap();
    assert_eq!(m.sources().len(), 2);
}

#[test]
fn shape_and_data_must_agree() {
    let dir = common::tempdir();
    let huge = TensorProto {
        name: "w".into(),
        dims: vec![1_000_000, 1_000_000],
        data_type: 1,
        raw_data: Bytes::from(vec![0u8; 16]),
        ..Default::default()
    };
    let e = load_error(dir.path(), &with_weight(huge));
    assert_contains(&e, &["initializer", "'w'", "16 bytes of raw_data"]);
    let typed = TensorProto {
        name: "w".into(),
        dims: vec![3],
        data_type: 1,
        float_data: vec![1.0; 5],
        ..Default::default()
    };
    let e = load_error(dir.path(), &with_weight(typed));
    assert_contains(&e, &["'w'", "5 entries in float_data"]);
    // Inside a Constant node the error names the node and attribute.
    let bad = TensorProto {
        name: "c".into(),
        dims: vec![8],
        data_type: 1,
        raw_data: Bytes::from(vec![0u8; 4]),
        ..Default::default()
    };
    let mut constant = node("Constant", "const0", &[], &["w"]);
    constant.attribute.push(AttributeProto {
        name: "value".into(),
        r#type: Some(AttributeType::Tensor as i32),
        t: Some(bad),
        ..Default::default()
    });
    let m = model(
        vec![constant, node("Add", "add", &["x", "w"], &["y"])],
        vec![],
        &["x"],
        &["y"],
    );
    let e = load_error(dir.path(), &m);
    assert_contains(
        &e,
        &[
            "node 'const0' (Constant)",
            "attribute 'value'",
            "'c'",
            "4 bytes",
        ],
    );
}

#[test]
fn truncated_protobuf_is_refused() {
    let dir = common::tempdir();
    let w = TensorProto {
        name: "w".into(),
        dims: vec![64],
        data_type: 1,
        raw_data: Bytes::from(vec![1u8; 256]),
        ..Default::default()
    };
    let bytes = with_weight(w).encode_to_vec();
    let path = dir.path().join("model.onnx");
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = Model::load(&path).unwrap_err().to_string();
    assert_contains(&e, &["model.onnx", "not a valid ONNX protobuf"]);
    std::fs::write(&path, b"").unwrap();
    let e = Model::load(&path).unwrap_err().to_string();
    assert_contains(&e, &["model.onnx", "no graph"]);
}

#[test]
fn cycles_are_refused() {
    let dir = common::tempdir();
    let m = model(
        vec![
            node("Add", "a", &["x", "q"], &["p"]),
            node("Relu", "b", &["p"], &["q"]),
        ],
        vec![],
        &["x"],
        &["q"],
    );
    let e = load_error(dir.path(), &m);
    assert_contains(&e, &["cycle", "'a' (Add)", "'b' (Relu)"]);
}

#[test]
fn duplicate_and_undefined_values_are_refused() {
    let dir = common::tempdir();
    let m = model(
        vec![
            node("Relu", "r1", &["x"], &["y"]),
            node("Relu", "r2", &["x"], &["y"]),
        ],
        vec![],
        &["x"],
        &["y"],
    );
    let e = load_error(dir.path(), &m);
    assert_contains(&e, &["'y'", "defined twice", "'r1' (Relu)", "'r2' (Relu)"]);
    let m = model(
        vec![node("Relu", "r1", &["nowhere"], &["y"])],
        vec![],
        &["x"],
        &["y"],
    );
    let e = load_error(dir.path(), &m);
    assert_contains(&e, &["'r1' (Relu)", "'nowhere'", "nothing defines"]);
    let m = model(
        vec![node("Relu", "r1", &["x"], &["y"])],
        vec![],
        &["x"],
        &["z"],
    );
    let e = load_error(dir.path(), &m);
    assert_contains(&e, &["graph output 'z'"]);
}

#[test]
fn attributes_of_the_wrong_type_are_refused() {
    let dir = common::tempdir();
    let mut conv = node("Conv", "conv0", &["x", "w"], &["y"]);
    conv.attribute.push(AttributeProto {
        name: "kernel_shape".into(),
        r#type: Some(AttributeType::Float as i32),
        f: Some(3.0),
        ..Default::default()
    });
    let w = TensorProto {
        name: "w".into(),
        dims: vec![1, 1, 3, 3],
        data_type: 1,
        float_data: vec![0.0; 9],
        ..Default::default()
    };
    let e = load_error(
        dir.path(),
        &model(vec![conv.clone()], vec![w.clone()], &["x"], &["y"]),
    );
    assert_contains(
        &e,
        &["'conv0' (Conv)", "'kernel_shape'", "FLOAT", "expected INTS"],
    );
    // A type field that says INTS while the value sits in `f`.
    conv.attribute[0].r#type = Some(AttributeType::Ints as i32);
    let e = load_error(dir.path(), &model(vec![conv], vec![w], &["x"], &["y"]));
    assert_contains(&e, &["'kernel_shape'", "carries a FLOAT value"]);
}

#[test]
fn the_cli_reports_one_line_and_fails() {
    let dir = common::tempdir();
    let path = dir.path().join("bad.onnx");
    std::fs::write(&path, b"\x0a\xff\xff\xff\xff\x0f garbage").unwrap();
    for args in [vec!["inspect"], vec!["convert"]] {
        let mut cmd = std::process::Command::new(common::quench_bin());
        cmd.args(&args).arg(&path);
        if args[0] == "convert" {
            cmd.arg(dir.path().join("out.onnx"));
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "one line expected: {stderr}"
        );
        assert!(
            stderr.starts_with("error: ")
                && stderr.contains("bad.onnx")
                && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
    assert!(
        !dir.path().join("out.onnx").exists(),
        "nothing is written for a bad input"
    );
}

#[test]
fn convert_never_overwrites_its_input() {
    let dir = common::tempdir();
    let w = TensorProto {
        name: "w".into(),
        dims: vec![4],
        data_type: 1,
        float_data: vec![1.0; 4],
        ..Default::default()
    };
    let path = dir.path().join("m.onnx");
    let bytes = with_weight(w).encode_to_vec();
    std::fs::write(&path, &bytes).unwrap();
    #[cfg(unix)]
    std::fs::hard_link(&path, dir.path().join("alias.onnx")).unwrap();
    for target in ["m.onnx", "./m.onnx", "alias.onnx"] {
        let out = std::process::Command::new(common::quench_bin())
            .current_dir(dir.path())
            .args(["convert", "m.onnx", target])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if target == "alias.onnx" && !cfg!(unix) {
            continue;
        }
        assert_eq!(out.status.code(), Some(1), "{target}: {stderr}");
        assert!(stderr.contains("refusing to write"), "{stderr}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "the input changed");
    }
}

/// Found by the fuzzer (tests/fuzz.rs, seed 7, case 7575): an input declared `[2^40, 0]` made an
/// empty tensor, which passed the limit on generated bytes and then kept tract's analysis busy
/// without end. Such a dim is refused, for generated inputs and for data alike, before a runtime
/// sees it.
#[test]
fn a_huge_dim_beside_a_zero_is_refused() {
    use quench::exec::inputs::{self, InputOptions, Source};
    use quench::exec::{self, Prepared, Tensor};
    let g = GraphProto {
        name: Some("g".into()),
        node: vec![node("Softmax", "s", &["x"], &["y"])],
        input: vec![quench::onnx::tensor::tensor_value_info(
            "x",
            1,
            &[1 << 40, 0],
        )],
        output: vec![common::value_info("y", 1)],
        ..Default::default()
    };
    let model = Model::from_proto(common::model_of(g), vec![]).unwrap();
    let prep = Prepared::from_model(&model, "m");
    let err = inputs::open(
        &Source::Random { count: 1 },
        &prep.inputs,
        &InputOptions::default(),
    )
    .err()
    .expect("a dim of 2^40 is refused");
    assert_contains(&format!("{err:#}"), &["'x'", "1099511627776", "axis 0"]);
    let empty = Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[1 << 40, 0])));
    let err = exec::check_batch(&prep.inputs, &[("x".to_string(), empty)])
        .err()
        .expect("data with such a dim is refused");
    assert_contains(&format!("{err:#}"), &["'x'", "axis 0"]);
}

/// Found by the fuzzer (seed 7, case 20999): a BatchNormalization whose data input `0` is declared
/// `[2, 3, 6, 6]` but has an initializer of the same name holding `[3]`. tract's shape rules crashed
/// the process on it (SIGSEGV); quench refuses it before tract reads it, naming the input.
#[test]
fn an_input_whose_default_has_another_shape_is_refused() {
    let g = GraphProto {
        name: Some("g".into()),
        node: vec![node(
            "BatchNormalization",
            "bn",
            &["0", "1", "2", "3", "4"],
            &["5"],
        )],
        initializer: vec![
            f32s("0", &[1.0; 3]),
            f32s("1", &[0.7, 0.6, 0.4]),
            f32s("2", &[0.0; 3]),
            f32s("3", &[0.0; 3]),
            f32s("4", &[1.0; 3]),
        ],
        input: vec![quench::onnx::tensor::tensor_value_info(
            "0",
            1,
            &[2, 3, 6, 6],
        )],
        output: vec![common::value_info("5", 1)],
        ..Default::default()
    };
    let err = tract_refusal(g);
    assert_contains(&err, &["input '0'", "[2, 3, 6, 6]", "[3]"]);
}

/// Found by the fuzzer (seed 8, case 54623): byte damage turned a Transpose's `perm` into `[1, 1]`,
/// and tract's analysis asked for 8 GiB and more (the kernel's OOM killer ended a run at 23 GB). A
/// `perm` that is not a permutation is refused before tract reads the model, naming the node.
#[test]
fn a_transpose_whose_perm_repeats_an_axis_is_refused() {
    let mut t = node("Transpose", "t", &["x"], &["y"]);
    t.attribute.push(AttributeProto {
        name: "perm".into(),
        r#type: Some(AttributeType::Ints as i32),
        ints: vec![1, 1],
        ..Default::default()
    });
    let g = GraphProto {
        name: Some("g".into()),
        node: vec![t],
        input: vec![quench::onnx::tensor::tensor_value_info("x", 1, &[2, 3])],
        output: vec![common::value_info("y", 1)],
        ..Default::default()
    };
    let err = tract_refusal(g);
    assert_contains(&err, &["'t' (Transpose)", "[1, 1]"]);
}

/// Found by the fuzzer (seed 7, case 523672): an input with a zero-length axis crashed the process
/// (SIGSEGV) inside onnxruntime's InstanceNormalization, which reads behind the data pointer of an
/// empty tensor; the pointer of an empty Rust buffer dangles. Empty tensors are legitimate (an empty
/// cache, an empty batch): the run must succeed, with an empty output, in both runtimes.
#[test]
fn an_empty_input_runs_in_both_runtimes() {
    use quench::exec::{self, Prepared, RuntimeKind, SessionOptions, Tensor};
    if !common::ort_ready() {
        return;
    }
    let g = GraphProto {
        name: Some("g".into()),
        node: vec![node(
            "InstanceNormalization",
            "in",
            &["x", "s", "b"],
            &["y"],
        )],
        initializer: vec![f32s("s", &[1.0; 10]), f32s("b", &[0.5; 10])],
        input: vec![quench::onnx::tensor::tensor_value_info(
            "x",
            1,
            &[2, 10, 32, 0],
        )],
        output: vec![common::value_info("y", 1)],
        ..Default::default()
    };
    let model = Model::from_proto(common::model_of(g), vec![]).unwrap();
    let prep = Prepared::from_model(&model, "m");
    let x = Tensor::F32(ndarray::ArrayD::zeros(vec![2, 10, 32, 0]));
    for rt in [RuntimeKind::Ort, RuntimeKind::Tract] {
        let mut s = exec::open(&prep, rt, &SessionOptions::default()).unwrap();
        for _ in 0..3 {
            let out = s.run(&[("x".to_string(), x.clone())]).unwrap();
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].1.shape(), &[2, 10, 32, 0], "{rt:?}");
        }
    }
}

/// Found by the fuzzer (seed 7, case 744929): byte damage gave a BatchNormalization a rank-1 data
/// input (`[3]`), and tract's shape rules read its channel axis unchecked, which aborted the process.
/// An operator laid out `[N, C, …]` whose data input has fewer than two axes is refused before tract
/// reads the model, naming the node.
#[test]
fn a_channel_first_operator_over_one_axis_is_refused() {
    let g = GraphProto {
        name: Some("g".into()),
        node: vec![node(
            "BatchNormalization",
            "bn",
            &["x", "s", "b", "m", "v"],
            &["y"],
        )],
        initializer: vec![
            f32s("s", &[1.0; 3]),
            f32s("b", &[0.0; 3]),
            f32s("m", &[0.0; 3]),
            f32s("v", &[1.0; 3]),
        ],
        input: vec![quench::onnx::tensor::tensor_value_info("x", 1, &[3])],
        output: vec![common::value_info("y", 1)],
        ..Default::default()
    };
    let err = tract_refusal(g);
    assert_contains(&err, &["'bn' (BatchNormalization)", "'x'", "1 axes"]);
}
