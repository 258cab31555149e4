//! Patches: the one way passes change a graph. A pass reads the graph, builds a `Patch` (new constants,
//! new nodes, uses to reroute, nodes to remove), and `Graph::apply` carries it out: it checks the whole
//! patch first, then edits values, nodes and back-links together and restores topological order. Nodes
//! a patch inserts record the pass that made them in `metadata_props` (key `quench.pass`).

use std::collections::{HashMap, HashSet};

use super::graph::{Def, Graph, Node, NodeId, Slot, Use, ValueId};
use super::names::Names;
use crate::error::{Error, Result};
use crate::onnx::pb::{AttributeProto, StringStringEntryProto, TensorProto};

/// The metadata key naming the pass that inserted a node.
pub const ORIGIN_KEY: &str = "quench.pass";

#[derive(Clone, Debug)]
pub struct NewNode {
    pub name: String,
    pub op_type: String,
    pub domain: String,
    pub inputs: Vec<Option<String>>,
    pub outputs: Vec<String>,
    pub attributes: Vec<AttributeProto>,
}

#[derive(Clone, Debug)]
enum Rewire {
    AllUses {
        from: String,
        to: String,
    },
    OneInput {
        node: NodeId,
        input: usize,
        to: String,
    },
}

#[derive(Clone, Debug)]
pub struct Patch {
    origin: String,
    constants: Vec<TensorProto>,
    nodes: Vec<NewNode>,
    rewires: Vec<Rewire>,
    removals: Vec<NodeId>,
}

/// What applying a patch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PatchSummary {
    pub constants_added: usize,
    pub nodes_added: usize,
    pub uses_rerouted: usize,
    pub nodes_removed: usize,
}

impl Patch {
    /// `origin` names the pass (and rule) making the patch; it is recorded on every node it inserts.
    pub fn new(origin: impl Into<String>) -> Patch {
        Patch {
            origin: origin.into(),
            constants: Vec::new(),
            nodes: Vec::new(),
            rewires: Vec::new(),
            removals: Vec::new(),
        }
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn is_empty(&self) -> bool {
        self.constants.is_empty()
            && self.nodes.is_empty()
            && self.rewires.is_empty()
            && self.removals.is_empty()
    }

    /// Adds an initializer under a fresh name derived from `base`; returns the name.
    pub fn constant(&mut self, names: &mut Names, base: &str, mut tensor: TensorProto) -> String {
        tensor.name = names.fresh(base);
        let name = tensor.name.clone();
        self.constants.push(tensor);
        name
    }

    /// Adds a node named after `base` with `outputs` fresh output names (`{name}_out{i}`); inputs are value
    /// names (None for an omitted optional input). Returns the output names.
    pub fn node(
        &mut self,
        names: &mut Names,
        base: &str,
        op_type: &str,
        domain: &str,
        inputs: &[Option<&str>],
        outputs: usize,
        attributes: Vec<AttributeProto>,
    ) -> Vec<String> {
        let name = names.fresh(base);
        let outputs: Vec<String> = (0..outputs)
            .map(|i| {
                names.fresh(&if outputs == 1 {
                    format!("{name}_out")
                } else {
                    format!("{name}_out{i}")
                })
            })
            .collect();
        self.nodes.push(NewNode {
            name,
            op_type: op_type.to_string(),
            domain: domain.to_string(),
            inputs: inputs.iter().map(|i| i.map(str::to_string)).collect(),
            outputs: outputs.clone(),
            attributes,
        });
        outputs
    }

    /// Every existing reader of `from` (not the nodes this patch adds) reads `to` instead. Graph outputs
    /// are never rerouted: that would rename an output of the model.
    pub fn replace_all_uses(&mut self, from: &str, to: &str) {
        self.rewires.push(Rewire::AllUses {
            from: from.into(),
            to: to.into(),
        });
    }

    /// Input `input` of `node` reads `to` instead of what it reads now.
    pub fn replace_input(&mut self, node: NodeId, input: usize, to: &str) {
        self.rewires.push(Rewire::OneInput {
            node,
            input,
            to: to.into(),
        });
    }

    /// Removes a node; after the patch's reroutes nothing may read its outputs.
    pub fn remove_node(&mut self, node: NodeId) {
        self.removals.push(node);
    }
}

impl Graph {
    /// Applies a patch. The patch is checked as a whole before anything changes, so a patch that names
    /// missing values, reuses names or removes a node still in use leaves the graph as it was.
    pub fn apply(&mut self, patch: Patch) -> Result<PatchSummary> {
        let err = |reason: String| Error::Patch {
            origin: patch.origin.clone(),
            reason,
        };
        self.check_patch(&patch).map_err(err)?;
        let mut summary = PatchSummary::default();

        for t in patch.constants {
            let id = self.push_value(&t.name, Def::Initializer);
            self.initializers.push(id);
            self.value_mut(id).initializer = Some(t);
            summary.constants_added += 1;
        }
        let mut new_nodes = Vec::with_capacity(patch.nodes.len());
        for n in &patch.nodes {
            let id = self.push_node(Node {
                name: n.name.clone(),
                op_type: n.op_type.clone(),
                domain: n.domain.clone(),
                overload: String::new(),
                inputs: Vec::new(),
                outputs: Vec::new(),
                attributes: n
                    .attributes
                    .iter()
                    .map(|a| super::graph::Attribute {
                        proto: a.clone(),
                        subgraphs: Vec::new(),
                        graph_list: false,
                    })
                    .collect(),
                doc_string: String::new(),
                metadata_props: vec![StringStringEntryProto {
                    key: ORIGIN_KEY.into(),
                    value: patch.origin.clone(),
                }],
                device_configurations: Vec::new(),
                explicit: 0,
            });
            let outputs = n
                .outputs
                .iter()
                .enumerate()
                .map(|(slot, o)| Some(self.push_value(o, Def::Node(id, slot))))
                .collect();
            self.node_mut_internal(id).outputs = outputs;
            new_nodes.push(id);
        }
        for (n, &id) in patch.nodes.iter().zip(&new_nodes) {
            let inputs: Vec<Option<ValueId>> = n
                .inputs
                .iter()
                .map(|i| i.as_ref().map(|name| self.by_name[name]))
                .collect();
            for (slot, v) in inputs.iter().enumerate() {
                if let Some(v) = v {
                    self.value_mut(*v).uses.push(Use {
                        node: id,
                        slot: Slot::Input(slot),
                    });
                }
            }
            self.node_mut_internal(id).inputs = inputs;
        }
        summary.nodes_added = new_nodes.len();
        let new_set: HashSet<NodeId> = new_nodes.iter().copied().collect();

        for rw in &patch.rewires {
            match rw {
                Rewire::AllUses { from, to } => {
                    let (from, to) = (self.by_name[from], self.by_name[to]);
                    let uses: Vec<Use> = self
                        .value(from)
                        .uses
                        .iter()
                        .filter(|u| !new_set.contains(&u.node))
                        .copied()
                        .collect();
                    for u in uses {
                        self.reroute_use(u, from, to);
                        summary.uses_rerouted += 1;
                    }
                }
                Rewire::OneInput { node, input, to } => {
                    let to = self.by_name[to];
                    let from = self.node(*node).inputs[*input].expect("checked");
                    self.reroute_use(
                        Use {
                            node: *node,
                            slot: Slot::Input(*input),
                        },
                        from,
                        to,
                    );
                    summary.uses_rerouted += 1;
                }
            }
        }

        let removed: HashSet<NodeId> = patch.removals.iter().copied().collect();
        for &id in &removed {
            let reads: Vec<(ValueId, Slot)> = {
                let n = self.node(id);
                let mut r: Vec<(ValueId, Slot)> = n
                    .inputs
                    .iter()
                    .enumerate()
                    .filter_map(|(i, v)| v.map(|v| (v, Slot::Input(i))))
                    .collect();
                r.extend(self.implicit_reads(id).map(|v| (v, Slot::Implicit)));
                r
            };
            for (v, slot) in reads {
                self.value_mut(v)
                    .uses
                    .retain(|u| !(u.node == id && u.slot == slot));
            }
        }
        for &id in &removed {
            let outputs: Vec<ValueId> = self.node(id).outputs.iter().flatten().copied().collect();
            for v in outputs {
                let name = self.value(v).name.clone();
                if !self.value(v).uses.is_empty() || self.is_output(v) {
                    unreachable!("checked before applying: '{name}' is still read");
                }
                self.by_name.remove(&name);
                self.values[v.index()] = None;
            }
            self.nodes[id.index()] = None;
            summary.nodes_removed += 1;
        }
        self.order.retain(|n| !removed.contains(n));
        if !new_nodes.is_empty() {
            self.order.extend(&new_nodes);
            let priority = self.insertion_priorities(&new_nodes);
            self.order =
                self.stable_topological_order(&priority)
                    .map_err(|nodes| Error::Patch {
                        origin: patch.origin.clone(),
                        reason: format!("the patch creates a cycle through {nodes}"),
                    })?;
        }
        Ok(summary)
    }

    /// New nodes go just before their earliest reader (nodes read only by other new nodes follow them).
    fn insertion_priorities(&self, new_nodes: &[NodeId]) -> HashMap<NodeId, (usize, usize)> {
        let position: HashMap<NodeId, usize> = self
            .order
            .iter()
            .enumerate()
            .map(|(i, &n)| (n, i))
            .collect();
        let mut priority: HashMap<NodeId, (usize, usize)> = HashMap::new();
        for (k, &id) in new_nodes.iter().enumerate().rev() {
            let readers = self
                .node(id)
                .outputs
                .iter()
                .flatten()
                .flat_map(|&v| self.value(v).uses.iter());
            let p = readers
                .map(|u| {
                    priority
                        .get(&u.node)
                        .map(|p| p.0)
                        .unwrap_or_else(|| position[&u.node])
                })
                .min()
                .unwrap_or(usize::MAX);
            priority.insert(id, (p, k));
        }
        priority
    }

    fn reroute_use(&mut self, u: Use, from: ValueId, to: ValueId) {
        self.value_mut(from).uses.retain(|x| *x != u);
        match u.slot {
            Slot::Input(i) => {
                self.node_mut_internal(u.node).inputs[i] = Some(to);
                self.value_mut(to).uses.push(u);
            }
            Slot::Implicit => {
                let (from_name, to_name) =
                    (self.value(from).name.clone(), self.value(to).name.clone());
                for a in &mut self.node_mut_internal(u.node).attributes {
                    for g in &mut a.subgraphs {
                        g.rename_outer(&from_name, &to_name);
                    }
                }
                if !self.value(to).uses.contains(&u) {
                    self.value_mut(to).uses.push(u);
                }
            }
        }
    }

    /// In a subgraph: reads of the outer value `from` become reads of the outer value `to`.
    pub(crate) fn rename_outer(&mut self, from: &str, to: &str) {
        let Some(fid) = self.value_id(from) else {
            return;
        };
        if self.value(fid).def != Def::Outer {
            return;
        }
        let node_ids: Vec<NodeId> = self.order.clone();
        for n in node_ids {
            for a in &mut self.node_mut_internal(n).attributes {
                for g in &mut a.subgraphs {
                    g.rename_outer(from, to);
                }
            }
        }
        match self.value_id(to) {
            Some(tid) => {
                let uses = std::mem::take(&mut self.value_mut(fid).uses);
                for u in uses {
                    if let Slot::Input(i) = u.slot {
                        self.node_mut_internal(u.node).inputs[i] = Some(tid);
                    }
                    if !self.value(tid).uses.contains(&u) {
                        self.value_mut(tid).uses.push(u);
                    }
                }
                for p in &mut self.outputs {
                    if p.value == fid {
                        p.value = tid;
                    }
                }
                self.by_name.remove(from);
                self.values[fid.index()] = None;
            }
            None => {
                self.by_name.remove(from);
                self.value_mut(fid).name = to.to_string();
                self.by_name.insert(to.to_string(), fid);
            }
        }
    }

    fn check_patch(&self, patch: &Patch) -> std::result::Result<(), String> {
        let mut made: HashSet<String> = HashSet::new();
        let mut fresh = |name: &str, what: &str| -> std::result::Result<(), String> {
            if name.is_empty() {
                return Err(format!("{what} has an empty name"));
            }
            if self.by_name.contains_key(name) || !made.insert(name.to_string()) {
                return Err(format!("{what} '{name}' reuses an existing name"));
            }
            Ok(())
        };
        for t in &patch.constants {
            fresh(&t.name, "constant")?;
        }
        for n in &patch.nodes {
            for o in &n.outputs {
                fresh(o, "output")?;
            }
        }
        let created = made;
        let exists = |name: &str| self.by_name.contains_key(name) || created.contains(name);
        for n in &patch.nodes {
            for i in n.inputs.iter().flatten() {
                if !exists(i) {
                    return Err(format!(
                        "node '{}' ({}) reads '{i}', which is not defined",
                        n.name, n.op_type
                    ));
                }
            }
        }
        let live = |id: NodeId| self.nodes.get(id.index()).is_some_and(Option::is_some);
        let mut rerouted_away: HashMap<ValueId, usize> = HashMap::new();
        for rw in &patch.rewires {
            match rw {
                Rewire::AllUses { from, to } => {
                    let Some(&fid) = self.by_name.get(from) else {
                        return Err(format!("cannot reroute '{from}': no such value"));
                    };
                    if !exists(to) {
                        return Err(format!("cannot reroute '{from}' to '{to}': no such value"));
                    }
                    if self.is_output(fid) {
                        return Err(format!(
                            "'{from}' is a graph output; rerouting it would rename the model's output"
                        ));
                    }
                    *rerouted_away.entry(fid).or_default() += self.value(fid).uses.len();
                }
                Rewire::OneInput { node, input, to } => {
                    if !live(*node) {
                        return Err(format!("cannot reroute an input of removed node {node:?}"));
                    }
                    let n = self.node(*node);
                    let Some(Some(from)) = n.inputs.get(*input) else {
                        return Err(format!("node {} has no input {input}", n.describe()));
                    };
                    if !exists(to) {
                        return Err(format!(
                            "cannot reroute input {input} of node {} to '{to}': no such value",
                            n.describe()
                        ));
                    }
                    *rerouted_away.entry(*from).or_default() += 1;
                }
            }
        }
        let removed: HashSet<NodeId> = patch.removals.iter().copied().collect();
        for &id in &removed {
            if !live(id) {
                return Err(format!("cannot remove node {id:?}: it does not exist"));
            }
            let n = self.node(id);
            for &v in n.outputs.iter().flatten() {
                let val = self.value(v);
                if self.is_output(v) {
                    return Err(format!(
                        "cannot remove node {}: its output '{}' is a graph output",
                        n.describe(),
                        val.name
                    ));
                }
                let remaining = val
                    .uses
                    .iter()
                    .filter(|u| !removed.contains(&u.node))
                    .count();
                let away = rerouted_away.get(&v).copied().unwrap_or(0);
                if remaining > away {
                    return Err(format!(
                        "cannot remove node {}: '{}' is still read",
                        n.describe(),
                        val.name
                    ));
                }
            }
            for n in &patch.nodes {
                for i in n.inputs.iter().flatten() {
                    if self
                        .node(id)
                        .outputs
                        .iter()
                        .flatten()
                        .any(|&v| self.value(v).name == *i)
                    {
                        return Err(format!(
                            "new node '{}' reads '{i}', an output of a removed node",
                            n.name
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}
