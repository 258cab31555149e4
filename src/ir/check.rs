//! The consistency check run before and after every pass in debug and test builds: unique value names
//! (across nested scopes), symmetric producer/use links, topological order, every read defined, and every
//! operator of a standard domain valid at the model's opset with correctly typed attributes.

use std::collections::HashSet;

use super::graph::{Def, Graph, Slot, Use};
use super::model::Model;
use super::opset::{Opsets, check_attribute, is_known_op, is_standard_domain, schema};

/// Checks a model; the error lists the first problems found.
pub fn check_model(model: &Model) -> Result<(), String> {
    let opsets = model.opsets();
    let mut problems = Vec::new();
    let mut seen = HashSet::new();
    check_graph(
        &model.graph,
        &opsets,
        &mut seen,
        &mut Vec::new(),
        "graph",
        &mut problems,
    );
    if problems.is_empty() {
        Ok(())
    } else {
        let n = problems.len();
        problems.truncate(5);
        let more = if n > 5 {
            format!(" (and {} more)", n - 5)
        } else {
            String::new()
        };
        Err(format!("{}{more}", problems.join("; ")))
    }
}

fn check_graph(
    g: &Graph,
    opsets: &Opsets,
    seen: &mut HashSet<String>,
    outer: &mut Vec<HashSet<String>>,
    place: &str,
    problems: &mut Vec<String>,
) {
    let here = format!("{place} '{}'", g.name);
    let mut local = HashSet::new();
    for (id, v) in g.values() {
        if g.value_id(&v.name) != Some(id) {
            problems.push(format!(
                "{here}: value '{}' is not indexed by its name",
                v.name
            ));
        }
        if v.def == Def::Outer {
            if !outer.iter().any(|s| s.contains(&v.name)) {
                problems.push(format!(
                    "{here}: outer value '{}' is defined by no enclosing graph",
                    v.name
                ));
            }
            continue;
        }
        if !seen.insert(v.name.clone()) {
            problems.push(format!("{here}: value name '{}' is used twice", v.name));
        }
        local.insert(v.name.clone());
        if let Def::Node(n, slot) = v.def
            && g.node(n).outputs().get(slot).copied().flatten() != Some(id)
        {
            problems.push(format!(
                "{here}: value '{}' names a producer that does not output it",
                v.name
            ));
        }
        if v.def == Def::Initializer && v.initializer.is_none() && v.sparse_initializer.is_none() {
            problems.push(format!("{here}: initializer '{}' has no tensor", v.name));
        }
        for u in &v.uses {
            let n = g.node(u.node);
            let ok = match u.slot {
                Slot::Input(i) => n.inputs().get(i).copied().flatten() == Some(id),
                Slot::Implicit => g.implicit_reads(u.node).any(|r| r == id),
            };
            if !ok {
                problems.push(format!(
                    "{here}: value '{}' lists a use by {} that does not read it",
                    v.name,
                    n.describe()
                ));
            }
        }
    }
    let mut defined: HashSet<_> = g
        .values()
        .filter(|(_, v)| !matches!(v.def, Def::Node(..)))
        .map(|(id, _)| id)
        .collect();
    for (id, n) in g.nodes() {
        for (i, v) in n.inputs().iter().enumerate() {
            let Some(v) = *v else { continue };
            if !g.value(v).uses.contains(&Use {
                node: id,
                slot: Slot::Input(i),
            }) {
                problems.push(format!(
                    "{here}: node {} reads '{}' without a use link",
                    n.describe(),
                    g.value(v).name
                ));
            }
        }
        for v in g.reads(id) {
            if !defined.contains(&v) {
                problems.push(format!(
                    "{here}: node {} reads '{}' before it is defined (not in topological order)",
                    n.describe(),
                    g.value(v).name
                ));
            }
        }
        for v in g.implicit_reads(id) {
            if !g.value(v).uses.contains(&Use {
                node: id,
                slot: Slot::Implicit,
            }) {
                problems.push(format!(
                    "{here}: node {} reads '{}' from a subgraph without a use link",
                    n.describe(),
                    g.value(v).name
                ));
            }
        }
        for (slot, v) in n.outputs().iter().enumerate() {
            if let Some(v) = *v {
                if g.value(v).def != Def::Node(id, slot) {
                    problems.push(format!(
                        "{here}: output '{}' of node {} is not linked back",
                        g.value(v).name,
                        n.describe()
                    ));
                }
                defined.insert(v);
            }
        }
        check_op(n, opsets, &here, problems);
        outer.push(local.clone());
        for sub in n.subgraphs() {
            check_graph(
                sub,
                opsets,
                seen,
                outer,
                &format!("{here}, node {} subgraph", n.describe()),
                problems,
            );
        }
        outer.pop();
    }
    for p in g.outputs() {
        if g.values[p.value.index()].is_none() {
            problems.push(format!("{here}: a graph output refers to a removed value"));
        }
    }
}

fn check_op(n: &super::graph::Node, opsets: &Opsets, here: &str, problems: &mut Vec<String>) {
    let Some(version) = opsets.version(&n.domain) else {
        problems.push(format!(
            "{here}: node {} uses domain '{}', which the model does not import",
            n.describe(),
            n.domain
        ));
        return;
    };
    if !is_standard_domain(&n.domain) {
        return;
    }
    let Some(s) = schema(&n.domain, &n.op_type, version) else {
        let why = if is_known_op(&n.domain, &n.op_type) {
            format!("needs a newer opset than {version}")
        } else {
            "is not an operator of this domain".to_string()
        };
        problems.push(format!("{here}: node {} {why}", n.describe()));
        return;
    };
    for a in n.attributes() {
        if let Err(e) = check_attribute(s, &a.proto) {
            problems.push(format!(
                "{here}: node {}: attribute '{}' {e}",
                n.describe(),
                a.name()
            ));
        }
    }
}
