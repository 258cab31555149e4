//! Rewriting: random valid patches keep the consistency invariant (checked after every edit, and after a
//! save and reload); invalid patches are refused without changing the graph; subgraph reads follow a
//! reroute; dead-node elimination and topological sorting behave.

mod common;

use proptest::prelude::*;
use prost::Message;
use quench::Model;
use quench::ir::{Patch, check_model};
use quench::onnx::pb::attribute_proto::AttributeType;
use quench::onnx::pb::*;
use quench::onnx::tensor::from_f32;
use quench::passes::{DeadNodeElimination, PassManager, TopologicalSort};

fn vi(name: &str) -> ValueInfoProto {
    common::value_info(name, 1)
}

fn node(op: &str, name: &str, inputs: &[String], output: &str) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.to_vec(),
        output: vec![output.into()],
        ..Default::default()
    }
}

/// A random DAG: each node reads one or two earlier values.
fn random_model(shape: &[(u8, usize, usize)]) -> Model {
    let mut values = vec!["x".to_string(), "c0".to_string()];
    let mut nodes = Vec::new();
    for (i, &(op, a, b)) in shape.iter().enumerate() {
        let out = format!("v{i}");
        let a = values[a % values.len()].clone();
        let b = values[b % values.len()].clone();
        let n = match op % 3 {
            0 => node("Relu", &format!("n{i}"), &[a], &out),
            1 => node("Add", &format!("n{i}"), &[a, b], &out),
            _ => node("Mul", &format!("n{i}"), &[a, b], &out),
        };
        nodes.push(n);
        values.push(out);
    }
    let last = values.last().unwrap().clone();
    let g = GraphProto {
        name: Some("g".into()),
        node: nodes,
        initializer: vec![from_f32("c0", &[1], &[0.5])],
        input: vec![vi("x")],
        output: vec![vi(&last)],
        ..Default::default()
    };
    Model::from_proto(common::model_of(g), vec![]).unwrap()
}

fn reload(m: &Model) -> Model {
    let bytes = m.to_proto().encode_to_vec();
    Model::load_bytes(bytes, None).expect("the patched model reloads")
}

#[derive(Debug, Clone)]
enum Edit {
    /// Put a Neg → Neg pair behind a value and reroute its readers through it.
    Intercept(usize),
    /// Add a constant to a value, feeding one reader's input.
    AddConstant(usize, usize),
    /// Try to remove a node (valid only when nothing reads it).
    Remove(usize),
    Dce,
}

fn edit_strategy() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<usize>().prop_map(Edit::Intercept),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::AddConstant(a, b)),
        any::<usize>().prop_map(Edit::Remove),
        Just(Edit::Dce),
    ]
}

fn apply_edit(m: &mut Model, e: &Edit) {
    let values: Vec<String> = m
        .graph
        .values()
        .map(|(_, v)| v.name().to_string())
        .collect();
    let nodes: Vec<_> = m.graph.node_ids().to_vec();
    match e {
        Edit::Intercept(k) => {
            let v = &values[k % values.len()];
            let id = m.graph.value_id(v).unwrap();
            if m.graph.is_output(id) {
                return;
            }
            let mut p = Patch::new("test/intercept");
            let a = p.node(&mut m.names, "neg", "Neg", "", &[Some(v)], 1, vec![]);
            let b = p.node(&mut m.names, "neg", "Neg", "", &[Some(&a[0])], 1, vec![]);
            p.replace_all_uses(v, &b[0]);
            m.graph.apply(p).unwrap();
        }
        Edit::AddConstant(k, r) => {
            let v = &values[k % values.len()];
            let readers: Vec<_> = m.graph.value(m.graph.value_id(v).unwrap()).uses().to_vec();
            let Some(u) = readers.get(r % readers.len().max(1)) else {
                return;
            };
            let quench::ir::Slot::Input(slot) = u.slot else {
                return;
            };
            let mut p = Patch::new("test/add");
            let c = p.constant(&mut m.names, "k", from_f32("", &[1], &[0.25]));
            let out = p.node(
                &mut m.names,
                "add",
                "Add",
                "",
                &[Some(v), Some(&c)],
                1,
                vec![],
            );
            p.replace_input(u.node, slot, &out[0]);
            m.graph.apply(p).unwrap();
        }
        Edit::Remove(k) => {
            let id = nodes[k % nodes.len()];
            let before = m.to_proto();
            let mut p = Patch::new("test/remove");
            p.remove_node(id);
            let n = m.graph.node(id);
            let unread = n
                .outputs()
                .iter()
                .flatten()
                .all(|&v| m.graph.value(v).uses().is_empty() && !m.graph.is_output(v));
            match m.graph.apply(p) {
                Ok(_) => assert!(unread, "removed a node whose output is read"),
                Err(err) => {
                    assert!(!unread, "refused a valid removal: {err}");
                    assert!(m.to_proto() == before, "a refused patch changed the graph");
                }
            }
        }
        Edit::Dce => {
            PassManager::with_checks(true)
                .run(m, &[&DeadNodeElimination, &TopologicalSort])
                .unwrap();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn random_patches_keep_the_graph_consistent(
        shape in prop::collection::vec((any::<u8>(), any::<usize>(), any::<usize>()), 1..24),
        edits in prop::collection::vec(edit_strategy(), 1..12),
    ) {
        let mut m = random_model(&shape);
        check_model(&m).unwrap();
        for e in &edits {
            apply_edit(&mut m, e);
            if let Err(err) = check_model(&m) {
                panic!("after {e:?}: {err}");
            }
        }
        let back = reload(&m);
        check_model(&back).unwrap();
        prop_assert!(back.to_proto() == m.to_proto());
    }
}

/// A model with an If whose branches read an outer value.
fn if_model() -> Model {
    let branch = |name: &str, op: &str| GraphProto {
        name: Some(name.into()),
        node: vec![node(
            op,
            &format!("{name}_op"),
            &["h".into()],
            &format!("{name}_out"),
        )],
        output: vec![vi(&format!("{name}_out"))],
        ..Default::default()
    };
    let mut iff = node("If", "if0", &["cond".into()], "y");
    iff.attribute = vec![
        AttributeProto {
            name: "then_branch".into(),
            r#type: Some(AttributeType::Graph as i32),
            g: Some(branch("then", "Relu")),
            ..Default::default()
        },
        AttributeProto {
            name: "else_branch".into(),
            r#type: Some(AttributeType::Graph as i32),
            g: Some(branch("else", "Neg")),
            ..Default::default()
        },
    ];
    let cond = common::value_info("cond", 9);
    let g = GraphProto {
        name: Some("main".into()),
        node: vec![node("Relu", "r", &["x".into()], "h"), iff],
        input: vec![vi("x"), cond],
        output: vec![vi("y")],
        ..Default::default()
    };
    Model::from_proto(common::model_of(g), vec![]).unwrap()
}

#[test]
fn rerouting_a_value_read_by_a_subgraph_renames_the_outer_read() {
    let mut m = if_model();
    let h = m.graph.value_id("h").unwrap();
    assert_eq!(
        m.graph.value(h).uses().len(),
        1,
        "the If reads h implicitly"
    );
    let mut p = Patch::new("test/intercept");
    let out = p.node(&mut m.names, "sq", "Sqrt", "", &[Some("h")], 1, vec![]);
    p.replace_all_uses("h", &out[0]);
    m.graph.apply(p).unwrap();
    check_model(&m).unwrap();
    let proto = m.to_proto();
    let g = proto.graph.unwrap();
    let iff = g.node.iter().find(|n| n.op_type() == "If").unwrap();
    let then = iff.attribute[0].g.as_ref().unwrap();
    assert_eq!(then.node[0].input, vec![out[0].clone()]);
    // The Sqrt must come before the If.
    let pos = |op: &str| g.node.iter().position(|n| n.op_type() == op).unwrap();
    assert!(pos("Sqrt") < pos("If"));
    check_model(&reload(&m)).unwrap();
}

#[test]
fn dead_nodes_and_unused_constants_go_outputs_stay() {
    let mut m = random_model(&[(0, 0, 0), (1, 2, 1), (2, 0, 1), (0, 3, 0)]);
    // Make a dead branch: a Neg nobody reads, and an unused initializer.
    let mut p = Patch::new("test");
    let c = p.constant(&mut m.names, "unused", from_f32("", &[2], &[1.0, 2.0]));
    p.node(&mut m.names, "dead", "Neg", "", &[Some(&c)], 1, vec![]);
    m.graph.apply(p).unwrap();
    let before = m.graph.node_ids().len();
    let reports = PassManager::with_checks(true)
        .run(&mut m, &[&DeadNodeElimination])
        .unwrap();
    assert!(reports[0].changed);
    assert!(m.graph.value_id("unused").is_none());
    assert!(m.graph.node_ids().len() < before);
    // The output's producer survives.
    let out = m.graph.outputs()[0].value;
    assert!(m.graph.value(out).producer().is_some());
    let again = PassManager::with_checks(true)
        .run(&mut m, &[&DeadNodeElimination])
        .unwrap();
    assert!(!again[0].changed, "a second run changes nothing");
}

#[test]
fn inserted_nodes_record_their_pass_and_names_stay_unique() {
    let mut m = random_model(&[(0, 0, 0)]);
    let mut p = Patch::new("quantize/w8");
    let a = p.node(&mut m.names, "n0", "Neg", "", &[Some("x")], 1, vec![]);
    assert_ne!(a[0], "n0_out", "fresh names avoid taken ones");
    m.graph.apply(p).unwrap();
    let proto = m.to_proto();
    let inserted = proto
        .graph
        .unwrap()
        .node
        .into_iter()
        .find(|n| n.op_type() == "Neg")
        .unwrap();
    assert_eq!(inserted.name(), "n0_1");
    assert_eq!(inserted.metadata_props[0].key, quench::ir::ORIGIN_KEY);
    assert_eq!(inserted.metadata_props[0].value, "quantize/w8");
}

#[test]
fn patches_that_break_the_graph_are_refused() {
    let mut m = random_model(&[(0, 0, 0), (1, 2, 1)]);
    let before = m.to_proto();
    let mut p = Patch::new("bad");
    p.node(
        &mut m.names,
        "r",
        "Relu",
        "",
        &[Some("no_such_value")],
        1,
        vec![],
    );
    let e = m.graph.apply(p).unwrap_err().to_string();
    assert!(e.contains("bad") && e.contains("no_such_value"), "{e}");
    let mut p = Patch::new("bad");
    let out = m.graph.outputs()[0].value;
    let name = m.graph.value_name(out).to_string();
    p.replace_all_uses(&name, "x");
    let e = m.graph.apply(p).unwrap_err().to_string();
    assert!(e.contains("graph output"), "{e}");
    assert!(m.to_proto() == before);
    // A model's default-domain opset is never raised.
    let e = m
        .require_op("", "DequantizeLinear", 21)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("DequantizeLinear") && e.contains("21") && e.contains("17"),
        "{e}"
    );
    m.require_op("com.microsoft", "MatMulNBits", 1).unwrap();
    assert_eq!(m.opset("com.microsoft"), Some(1));
}
