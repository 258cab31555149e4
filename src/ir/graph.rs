//! The graph: values (with their producer and their uses), nodes and their attributes, subgraphs, and the
//! conversion from and to GraphProto. Back-links (producer, uses) are maintained only by the methods of
//! this module and of patch.rs, never by callers.
//!
//! A subgraph (If / Loop / Scan body) is a `Graph` of its own. A name it reads but does not define is an
//! *outer* value in it, and the node owning the subgraph records an *implicit* use of that name in its
//! own graph, so that dead-node elimination and topological sorting see the dependency.

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::num::NonZeroU32;

use super::opset::{Opsets, check_attribute, is_standard_domain, schema};
use crate::error::{Error, Result};
use crate::onnx::pb::{
    AttributeProto, GraphProto, NodeDeviceConfigurationProto, NodeProto, SparseTensorProto,
    StringStringEntryProto, TensorAnnotation, TensorProto, ValueInfoProto,
};
use crate::onnx::tensor::validate;

macro_rules! id_type {
    ($name:ident) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(NonZeroU32);

        impl $name {
            fn from_index(i: usize) -> Self {
                $name(NonZeroU32::new(u32::try_from(i + 1).expect("graph too large")).unwrap())
            }
            pub fn index(self) -> usize {
                self.0.get() as usize - 1
            }
        }
    };
}
id_type!(ValueId);
id_type!(NodeId);

/// How a node reads a value: through one of its inputs, or from inside one of its subgraphs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    Input(usize),
    Implicit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Use {
    pub node: NodeId,
    pub slot: Slot,
}

/// Where a value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Def {
    /// A graph input (possibly with an initializer as its default, in IR < 4 models).
    Input,
    /// An initializer or sparse initializer.
    Initializer,
    /// Output `slot` of a node.
    Node(NodeId, usize),
    /// Defined in an enclosing graph.
    Outer,
}

#[derive(Clone, Debug)]
pub struct Value {
    pub(crate) name: String,
    pub(crate) def: Def,
    pub(crate) initializer: Option<TensorProto>,
    pub(crate) sparse_initializer: Option<SparseTensorProto>,
    pub(crate) uses: Vec<Use>,
}

impl Value {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn def(&self) -> Def {
        self.def
    }
    pub fn uses(&self) -> &[Use] {
        &self.uses
    }
    pub fn initializer(&self) -> Option<&TensorProto> {
        self.initializer.as_ref()
    }
    pub fn sparse_initializer(&self) -> Option<&SparseTensorProto> {
        self.sparse_initializer.as_ref()
    }
    pub fn producer(&self) -> Option<(NodeId, usize)> {
        match self.def {
            Def::Node(n, s) => Some((n, s)),
            _ => None,
        }
    }
}

/// A node attribute. Graph-valued attributes keep their graphs as IR graphs; `proto` holds everything
/// else (its `g` / `graphs` fields are empty while the graph lives in the IR).
#[derive(Clone, Debug)]
pub struct Attribute {
    pub proto: AttributeProto,
    pub(crate) subgraphs: Vec<Graph>,
    /// The graphs came from the repeated `graphs` field (GRAPHS), not from `g` (GRAPH).
    pub(crate) graph_list: bool,
}

impl Attribute {
    pub fn name(&self) -> &str {
        &self.proto.name
    }
    pub fn subgraphs(&self) -> &[Graph] {
        &self.subgraphs
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    pub domain: String,
    pub overload: String,
    pub(crate) inputs: Vec<Option<ValueId>>,
    pub(crate) outputs: Vec<Option<ValueId>>,
    pub(crate) attributes: Vec<Attribute>,
    pub doc_string: String,
    pub metadata_props: Vec<StringStringEntryProto>,
    pub device_configurations: Vec<NodeDeviceConfigurationProto>,
    /// Which of the string fields above were present in the file although empty.
    pub(crate) explicit: u8,
}

impl Node {
    pub fn inputs(&self) -> &[Option<ValueId>] {
        &self.inputs
    }
    pub fn outputs(&self) -> &[Option<ValueId>] {
        &self.outputs
    }
    pub fn input(&self, i: usize) -> Option<ValueId> {
        self.inputs.get(i).copied().flatten()
    }
    pub fn attributes(&self) -> &[Attribute] {
        &self.attributes
    }
    pub fn attribute(&self, name: &str) -> Option<&AttributeProto> {
        self.attributes
            .iter()
            .find(|a| a.proto.name == name)
            .map(|a| &a.proto)
    }
    pub fn int_attribute(&self, name: &str) -> Option<i64> {
        self.attribute(name).map(|a| a.i())
    }
    pub fn subgraphs(&self) -> impl Iterator<Item = &Graph> {
        self.attributes.iter().flat_map(|a| a.subgraphs.iter())
    }
    /// `name (op_type)`, how messages refer to a node.
    pub fn describe(&self) -> String {
        format!("'{}' ({})", self.name, self.op_type)
    }
}

/// A graph input or output: the value and the rest of its ValueInfoProto (type, doc, metadata).
#[derive(Clone, Debug)]
pub struct Port {
    pub value: ValueId,
    pub info: ValueInfoProto,
}

/// A value_info entry; `value` is None when the entry names no value of this graph (kept as it is).
#[derive(Clone, Debug)]
pub struct InfoEntry {
    pub value: Option<ValueId>,
    pub info: ValueInfoProto,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    pub doc_string: String,
    pub metadata_props: Vec<StringStringEntryProto>,
    pub quantization_annotation: Vec<TensorAnnotation>,
    pub(crate) values: Vec<Option<Value>>,
    pub(crate) nodes: Vec<Option<Node>>,
    pub(crate) order: Vec<NodeId>,
    pub(crate) by_name: HashMap<String, ValueId>,
    pub(crate) inputs: Vec<Port>,
    pub(crate) outputs: Vec<Port>,
    pub(crate) value_info: Vec<InfoEntry>,
    pub(crate) initializers: Vec<ValueId>,
    pub(crate) sparse_initializers: Vec<ValueId>,
    pub(crate) explicit: u8,
}

/// A node ready to be placed, smallest key first.
type Ready = std::cmp::Reverse<((usize, usize, usize), NodeId)>;

// Presence bits of optional string fields: a field present but empty in the file is written back so.
const NAME: u8 = 1;
const OP: u8 = 2;
const DOMAIN: u8 = 4;
const OVERLOAD: u8 = 8;
const DOC: u8 = 16;

fn take_field(field: &mut Option<String>, bit: u8, explicit: &mut u8) -> String {
    match field.take() {
        Some(s) => {
            if s.is_empty() {
                *explicit |= bit;
            }
            s
        }
        None => String::new(),
    }
}

fn give_field(value: &str, bit: u8, explicit: u8) -> Option<String> {
    (!value.is_empty() || explicit & bit != 0).then(|| value.to_string())
}

/// What a graph is, for messages: "graph 'main'" or "subgraph 'then' of node 'If_0' (If)".
pub(crate) fn place_of(g: &GraphProto, parent: Option<&str>) -> String {
    match parent {
        None => format!("graph '{}'", g.name()),
        Some(p) => format!("{p}, subgraph '{}'", g.name()),
    }
}

/// Names visible from enclosing graphs while a subgraph is built.
pub(crate) struct Scope<'a> {
    pub names: &'a HashSet<String>,
    pub parent: Option<&'a Scope<'a>>,
}

impl Scope<'_> {
    fn contains(&self, name: &str) -> bool {
        self.names.contains(name) || self.parent.is_some_and(|p| p.contains(name))
    }
}

impl Graph {
    // ----- reading -----

    pub fn value(&self, id: ValueId) -> &Value {
        self.values[id.index()].as_ref().expect("value was removed")
    }
    pub fn node(&self, id: NodeId) -> &Node {
        self.nodes[id.index()].as_ref().expect("node was removed")
    }
    pub fn value_id(&self, name: &str) -> Option<ValueId> {
        self.by_name.get(name).copied()
    }
    pub fn value_name(&self, id: ValueId) -> &str {
        &self.value(id).name
    }
    /// Nodes in topological order.
    pub fn node_ids(&self) -> &[NodeId] {
        &self.order
    }
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.order.iter().map(|&id| (id, self.node(id)))
    }
    pub fn values(&self) -> impl Iterator<Item = (ValueId, &Value)> {
        self.values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.as_ref().map(|v| (ValueId::from_index(i), v)))
    }
    pub fn inputs(&self) -> &[Port] {
        &self.inputs
    }
    pub fn outputs(&self) -> &[Port] {
        &self.outputs
    }
    pub fn value_info(&self) -> &[InfoEntry] {
        &self.value_info
    }
    pub fn initializers(&self) -> &[ValueId] {
        &self.initializers
    }
    pub fn sparse_initializers(&self) -> &[ValueId] {
        &self.sparse_initializers
    }
    pub fn is_output(&self, v: ValueId) -> bool {
        self.outputs.iter().any(|p| p.value == v)
    }
    /// The ValueInfoProto that describes a value's type, wherever it is declared.
    pub fn info_of(&self, v: ValueId) -> Option<&ValueInfoProto> {
        self.inputs
            .iter()
            .chain(&self.outputs)
            .find(|p| p.value == v)
            .map(|p| &p.info)
            .or_else(|| {
                self.value_info
                    .iter()
                    .find(|e| e.value == Some(v))
                    .map(|e| &e.info)
            })
    }
    pub fn node_count_recursive(&self) -> usize {
        self.nodes()
            .map(|(_, n)| {
                1 + n
                    .subgraphs()
                    .map(Graph::node_count_recursive)
                    .sum::<usize>()
            })
            .sum()
    }

    // ----- building from protobuf -----

    pub(crate) fn from_proto(
        g: GraphProto,
        opsets: &Opsets,
        scope: Option<&Scope>,
        parent: Option<&str>,
    ) -> Result<Graph> {
        let place = place_of(&g, parent);
        let mut explicit = 0;
        let mut g = g;
        let mut graph = Graph {
            name: take_field(&mut g.name, NAME, &mut explicit),
            doc_string: take_field(&mut g.doc_string, DOC, &mut explicit),
            metadata_props: g.metadata_props,
            quantization_annotation: g.quantization_annotation,
            ..Default::default()
        };
        let mut defined_by: HashMap<String, String> = HashMap::new();
        let mut define =
            |graph: &mut Graph, name: &str, what: String, def: Def| -> Result<ValueId> {
                if name.is_empty() {
                    return Err(Error::Model(format!("{place}: {what} has an empty name")));
                }
                if let Some(first) = defined_by.get(name) {
                    return Err(Error::DuplicateValue {
                        place: place.clone(),
                        name: name.to_string(),
                        first: first.clone(),
                        second: what,
                    });
                }
                if scope.is_some_and(|s| s.contains(name)) {
                    return Err(Error::DuplicateValue {
                        place: place.clone(),
                        name: name.to_string(),
                        first: "a value of an enclosing graph".into(),
                        second: what,
                    });
                }
                defined_by.insert(name.to_string(), what);
                Ok(graph.push_value(name, def))
            };

        for t in g.initializer {
            validate(&t).map_err(|reason| Error::Tensor {
                place: format!("{place}, initializer"),
                tensor: t.name.clone(),
                reason,
            })?;
            let id = define(
                &mut graph,
                &t.name,
                format!("initializer '{}'", t.name),
                Def::Initializer,
            )?;
            graph.initializers.push(id);
            graph.values[id.index()].as_mut().unwrap().initializer = Some(t);
        }
        for s in g.sparse_initializer {
            let name = s
                .values
                .as_ref()
                .map(|v| v.name.clone())
                .unwrap_or_default();
            check_sparse(&s).map_err(|reason| Error::Tensor {
                place: format!("{place}, sparse initializer"),
                tensor: name.clone(),
                reason,
            })?;
            let id = define(
                &mut graph,
                &name,
                format!("sparse initializer '{name}'"),
                Def::Initializer,
            )?;
            graph.sparse_initializers.push(id);
            graph.values[id.index()]
                .as_mut()
                .unwrap()
                .sparse_initializer = Some(s);
        }
        for info in g.input {
            let id = match graph.by_name.get(&info.name) {
                // IR < 4: an initializer listed as an input is the input's default value.
                Some(&id) if graph.inputs.iter().all(|p| p.value != id) => {
                    graph.values[id.index()].as_mut().unwrap().def = Def::Input;
                    id
                }
                _ => define(
                    &mut graph,
                    &info.name,
                    format!("graph input '{}'", info.name),
                    Def::Input,
                )?,
            };
            graph.inputs.push(Port { value: id, info });
        }
        // Register every node output first, so that subgraphs can see all names of this graph and the
        // order of nodes can be checked (and repaired) afterwards.
        let mut protos = g.node;
        let mut node_ids = Vec::with_capacity(protos.len());
        for (i, n) in protos.iter_mut().enumerate() {
            let node_id = NodeId::from_index(i);
            let mut outputs = Vec::with_capacity(n.output.len());
            for (slot, out) in n.output.iter().enumerate() {
                if out.is_empty() {
                    outputs.push(None);
                    continue;
                }
                let what = format!("output of node '{}' ({})", n.name(), n.op_type());
                outputs.push(Some(define(
                    &mut graph,
                    out,
                    what,
                    Def::Node(node_id, slot),
                )?));
            }
            let mut explicit = 0;
            graph.nodes.push(Some(Node {
                name: take_field(&mut n.name, NAME, &mut explicit),
                op_type: take_field(&mut n.op_type, OP, &mut explicit),
                domain: take_field(&mut n.domain, DOMAIN, &mut explicit),
                overload: take_field(&mut n.overload, OVERLOAD, &mut explicit),
                doc_string: take_field(&mut n.doc_string, DOC, &mut explicit),
                explicit,
                inputs: Vec::new(),
                outputs,
                attributes: Vec::new(),
                metadata_props: std::mem::take(&mut n.metadata_props),
                device_configurations: std::mem::take(&mut n.device_configurations),
            }));
            node_ids.push(node_id);
        }
        let local: HashSet<String> = graph.by_name.keys().cloned().collect();
        let inner_scope = Scope {
            names: &local,
            parent: scope,
        };

        for (i, n) in protos.into_iter().enumerate() {
            let node_id = node_ids[i];
            let (name, op_type, domain) = {
                let node = graph.node(node_id);
                (node.name.clone(), node.op_type.clone(), node.domain.clone())
            };
            let node_place = format!("{place}, node '{name}' ({op_type})");
            let known = is_standard_domain(&domain)
                .then(|| {
                    opsets
                        .version(&domain)
                        .and_then(|v| schema(&domain, &op_type, v))
                })
                .flatten();
            let mut attributes = Vec::with_capacity(n.attribute.len());
            let mut outer_reads: Vec<String> = Vec::new();
            for mut a in n.attribute {
                if let Some(s) = known {
                    check_attribute(s, &a).map_err(|reason| Error::Attribute {
                        place: place.clone(),
                        node: name.clone(),
                        op_type: op_type.clone(),
                        attribute: a.name.clone(),
                        reason,
                    })?;
                }
                check_attribute_tensors(&a).map_err(|(tensor, reason)| Error::Tensor {
                    place: format!("{node_place} attribute '{}'", a.name),
                    tensor,
                    reason,
                })?;
                let mut subgraphs = Vec::new();
                let graph_list = a.g.is_none() && !a.graphs.is_empty();
                let protos: Vec<GraphProto> =
                    a.g.take().into_iter().chain(a.graphs.drain(..)).collect();
                for sg in protos {
                    let sub = Graph::from_proto(sg, opsets, Some(&inner_scope), Some(&node_place))?;
                    for (_, v) in sub.values() {
                        if v.def == Def::Outer && !outer_reads.contains(&v.name) {
                            outer_reads.push(v.name.clone());
                        }
                    }
                    subgraphs.push(sub);
                }
                attributes.push(Attribute {
                    proto: a,
                    subgraphs,
                    graph_list,
                });
            }
            let mut inputs = Vec::with_capacity(n.input.len());
            for (slot, inp) in n.input.iter().enumerate() {
                if inp.is_empty() {
                    inputs.push(None);
                    continue;
                }
                let id = graph
                    .resolve(inp, scope)
                    .ok_or_else(|| Error::UndefinedValue {
                        place: place.clone(),
                        node: name.clone(),
                        op_type: op_type.clone(),
                        value: inp.clone(),
                    })?;
                graph.values[id.index()].as_mut().unwrap().uses.push(Use {
                    node: node_id,
                    slot: Slot::Input(slot),
                });
                inputs.push(Some(id));
            }
            for outer in outer_reads {
                let id = graph
                    .resolve(&outer, scope)
                    .ok_or_else(|| Error::UndefinedValue {
                        place: place.clone(),
                        node: name.clone(),
                        op_type: op_type.clone(),
                        value: outer.clone(),
                    })?;
                graph.values[id.index()].as_mut().unwrap().uses.push(Use {
                    node: node_id,
                    slot: Slot::Implicit,
                });
            }
            let node = graph.nodes[node_id.index()].as_mut().unwrap();
            node.inputs = inputs;
            node.attributes = attributes;
        }
        for info in g.output {
            let id = graph
                .resolve(&info.name, scope)
                .ok_or_else(|| Error::UndefinedOutput {
                    place: place.clone(),
                    value: info.name.clone(),
                })?;
            graph.outputs.push(Port { value: id, info });
        }
        for info in g.value_info {
            let value = graph.by_name.get(&info.name).copied();
            graph.value_info.push(InfoEntry { value, info });
        }
        graph.order = node_ids;
        graph.explicit = explicit;
        if !graph.is_topologically_sorted() {
            graph.order = graph
                .stable_topological_order(&HashMap::new())
                .map_err(|nodes| Error::Cycle {
                    place: place.clone(),
                    nodes,
                })?;
        }
        Ok(graph)
    }

    /// The value a name denotes here: a value of this graph, or (in a subgraph) a new outer value when
    /// an enclosing graph defines it.
    fn resolve(&mut self, name: &str, scope: Option<&Scope>) -> Option<ValueId> {
        if let Some(&id) = self.by_name.get(name) {
            return Some(id);
        }
        if scope.is_some_and(|s| s.contains(name)) {
            return Some(self.push_value(name, Def::Outer));
        }
        None
    }

    pub(crate) fn push_value(&mut self, name: &str, def: Def) -> ValueId {
        let id = ValueId::from_index(self.values.len());
        self.values.push(Some(Value {
            name: name.to_string(),
            def,
            initializer: None,
            sparse_initializer: None,
            uses: Vec::new(),
        }));
        self.by_name.insert(name.to_string(), id);
        id
    }

    pub(crate) fn push_node(&mut self, node: Node) -> NodeId {
        let id = NodeId::from_index(self.nodes.len());
        self.nodes.push(Some(node));
        id
    }

    pub(crate) fn value_mut(&mut self, id: ValueId) -> &mut Value {
        self.values[id.index()].as_mut().expect("value was removed")
    }

    pub(crate) fn node_mut_internal(&mut self, id: NodeId) -> &mut Node {
        self.nodes[id.index()].as_mut().expect("node was removed")
    }

    /// Editable metadata of a node (name, doc, metadata_props); its edges are changed only by patches.
    pub fn node_meta_mut(
        &mut self,
        id: NodeId,
    ) -> (&mut String, &mut String, &mut Vec<StringStringEntryProto>) {
        let n = self.node_mut_internal(id);
        (&mut n.name, &mut n.doc_string, &mut n.metadata_props)
    }

    // ----- order -----

    pub fn is_topologically_sorted(&self) -> bool {
        let mut done: HashSet<NodeId> = HashSet::new();
        for &id in &self.order {
            let reads_ready = self.reads(id).all(|v| match self.value(v).def {
                Def::Node(p, _) => done.contains(&p),
                _ => true,
            });
            if !reads_ready {
                return false;
            }
            done.insert(id);
        }
        true
    }

    /// Every value a node reads, explicitly or from inside its subgraphs.
    pub(crate) fn reads(&self, id: NodeId) -> impl Iterator<Item = ValueId> + '_ {
        let explicit = self.node(id).inputs.iter().flatten().copied();
        let implicit = self.implicit_reads(id);
        explicit.chain(implicit)
    }

    pub(crate) fn implicit_reads(&self, id: NodeId) -> impl Iterator<Item = ValueId> + '_ {
        self.node(id)
            .subgraphs()
            .flat_map(|g| {
                g.values()
                    .filter(|(_, v)| v.def == Def::Outer)
                    .map(|(_, v)| v.name.clone())
            })
            .filter_map(|name| self.value_id(&name))
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// A topological order that keeps nodes as close to `priority` order as dependencies allow (Kahn's
    /// algorithm, smallest key first). Nodes without a key sort by their current position. Fails with
    /// the names of the nodes left on a cycle.
    pub(crate) fn stable_topological_order(
        &self,
        priority: &HashMap<NodeId, (usize, usize)>,
    ) -> std::result::Result<Vec<NodeId>, String> {
        let live: Vec<NodeId> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.is_some())
            .map(|(i, _)| NodeId::from_index(i))
            .collect();
        let position: HashMap<NodeId, usize> = self
            .order
            .iter()
            .enumerate()
            .map(|(i, &n)| (n, i))
            .collect();
        let key = |n: NodeId| -> (usize, usize, usize) {
            match priority.get(&n) {
                Some(&(p, sub)) => (p, sub, n.index()),
                None => (
                    position.get(&n).copied().unwrap_or(usize::MAX),
                    usize::MAX,
                    n.index(),
                ),
            }
        };
        let mut pending: HashMap<NodeId, usize> = HashMap::new();
        let mut consumers: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
        for &n in &live {
            let producers: HashSet<NodeId> = self
                .reads(n)
                .filter_map(|v| self.value(v).producer().map(|(p, _)| p))
                .collect();
            pending.insert(n, producers.len());
            for p in producers {
                consumers.entry(p).or_default().push(n);
            }
        }
        let mut ready: BinaryHeap<Ready> = live
            .iter()
            .filter(|n| pending[n] == 0)
            .map(|&n| std::cmp::Reverse((key(n), n)))
            .collect();
        let mut out = Vec::with_capacity(live.len());
        while let Some(std::cmp::Reverse((_, n))) = ready.pop() {
            out.push(n);
            for &c in consumers.get(&n).map(Vec::as_slice).unwrap_or(&[]) {
                let left = pending.get_mut(&c).unwrap();
                *left -= 1;
                if *left == 0 {
                    ready.push(std::cmp::Reverse((key(c), c)));
                }
            }
        }
        if out.len() != live.len() {
            let mut stuck: Vec<String> = live
                .iter()
                .filter(|n| pending[n] > 0)
                .map(|&n| self.node(n).describe())
                .collect();
            stuck.sort();
            stuck.truncate(8);
            return Err(stuck.join(", "));
        }
        Ok(out)
    }

    // ----- back to protobuf -----

    pub fn to_proto(&self) -> GraphProto {
        let name_of = |id: ValueId| self.value(id).name.clone();
        let port = |p: &Port| ValueInfoProto {
            name: name_of(p.value),
            ..p.info.clone()
        };
        GraphProto {
            node: self.order.iter().map(|&id| self.node_proto(id)).collect(),
            name: give_field(&self.name, NAME, self.explicit),
            initializer: self
                .initializers
                .iter()
                .map(|&id| {
                    let v = self.value(id);
                    TensorProto {
                        name: v.name.clone(),
                        ..v.initializer.clone().expect("initializer")
                    }
                })
                .collect(),
            sparse_initializer: self
                .sparse_initializers
                .iter()
                .map(|&id| {
                    let v = self.value(id);
                    let mut s = v.sparse_initializer.clone().expect("sparse initializer");
                    if let Some(values) = s.values.as_mut() {
                        values.name = v.name.clone();
                    }
                    s
                })
                .collect(),
            doc_string: give_field(&self.doc_string, DOC, self.explicit),
            input: self.inputs.iter().map(port).collect(),
            output: self.outputs.iter().map(port).collect(),
            value_info: self
                .value_info
                .iter()
                .filter_map(|e| match e.value {
                    None => Some(e.info.clone()),
                    Some(id) => self.values[id.index()].as_ref().map(|v| ValueInfoProto {
                        name: v.name.clone(),
                        ..e.info.clone()
                    }),
                })
                .collect(),
            quantization_annotation: self.quantization_annotation.clone(),
            metadata_props: self.metadata_props.clone(),
        }
    }

    fn node_proto(&self, id: NodeId) -> NodeProto {
        let n = self.node(id);
        let names = |ids: &[Option<ValueId>]| -> Vec<String> {
            ids.iter()
                .map(|v| v.map(|v| self.value(v).name.clone()).unwrap_or_default())
                .collect()
        };
        NodeProto {
            input: names(&n.inputs),
            output: names(&n.outputs),
            name: give_field(&n.name, NAME, n.explicit),
            op_type: give_field(&n.op_type, OP, n.explicit),
            domain: give_field(&n.domain, DOMAIN, n.explicit),
            overload: give_field(&n.overload, OVERLOAD, n.explicit),
            attribute: n
                .attributes
                .iter()
                .map(|a| {
                    let mut p = a.proto.clone();
                    let mut graphs: Vec<GraphProto> =
                        a.subgraphs.iter().map(Graph::to_proto).collect();
                    if a.graph_list {
                        p.graphs = graphs;
                    } else {
                        p.g = graphs.pop();
                    }
                    p
                })
                .collect(),
            doc_string: give_field(&n.doc_string, DOC, n.explicit),
            metadata_props: n.metadata_props.clone(),
            device_configurations: n.device_configurations.clone(),
        }
    }
}

fn check_sparse(s: &SparseTensorProto) -> std::result::Result<(), String> {
    let values = s.values.as_ref().ok_or("has no values")?;
    let indices = s.indices.as_ref().ok_or("has no indices")?;
    validate(values).map_err(|r| format!("values {r}"))?;
    validate(indices).map_err(|r| format!("indices {r}"))?;
    crate::onnx::tensor::element_count(&s.dims)?;
    if values.dims.len() != 1 {
        return Err(format!("values must be 1-D, have shape {:?}", values.dims));
    }
    let nnz = values.dims[0];
    let ok = match indices.dims.as_slice() {
        [n] => *n == nnz,
        [n, r] => *n == nnz && *r == s.dims.len() as i64,
        _ => false,
    };
    if !ok {
        return Err(format!(
            "indices shape {:?} does not fit {} values of a rank-{} tensor",
            indices.dims,
            nnz,
            s.dims.len()
        ));
    }
    Ok(())
}

/// Validates the tensors carried directly by an attribute (subgraph tensors are checked when the subgraph
/// is built). The error names the tensor.
fn check_attribute_tensors(a: &AttributeProto) -> std::result::Result<(), (String, String)> {
    for t in a.t.iter().chain(&a.tensors) {
        validate(t).map_err(|r| (t.name.clone(), r))?;
    }
    for s in a.sparse_tensor.iter().chain(&a.sparse_tensors) {
        let name = s
            .values
            .as_ref()
            .map(|v| v.name.clone())
            .unwrap_or_default();
        check_sparse(s).map_err(|r| (name, r))?;
    }
    Ok(())
}

impl Graph {
    /// Runs `f` on every subgraph of a node, then brings the node's implicit uses up to date with what
    /// the subgraphs now read from outside.
    pub fn with_subgraphs<R>(
        &mut self,
        id: NodeId,
        mut f: impl FnMut(&mut Graph) -> Result<R>,
    ) -> Result<Vec<R>> {
        let mut out = Vec::new();
        let mut attributes = std::mem::take(&mut self.node_mut_internal(id).attributes);
        let mut result = Ok(());
        'outer: for a in &mut attributes {
            for g in &mut a.subgraphs {
                match f(g) {
                    Ok(r) => out.push(r),
                    Err(e) => {
                        result = Err(e);
                        break 'outer;
                    }
                }
            }
        }
        self.node_mut_internal(id).attributes = attributes;
        self.refresh_implicit_uses(id);
        result.map(|_| out)
    }

    /// Runs `f` on subgraph `index` of attribute `attr` of a node (None when there is no such
    /// subgraph), then brings the node's implicit uses up to date.
    pub fn with_subgraph<R>(
        &mut self,
        id: NodeId,
        attr: &str,
        index: usize,
        f: impl FnOnce(&mut Graph) -> Result<R>,
    ) -> Result<Option<R>> {
        let mut attributes = std::mem::take(&mut self.node_mut_internal(id).attributes);
        let result = attributes
            .iter_mut()
            .find(|a| a.name() == attr)
            .and_then(|a| a.subgraphs.get_mut(index))
            .map(f)
            .transpose();
        self.node_mut_internal(id).attributes = attributes;
        self.refresh_implicit_uses(id);
        result
    }

    /// The graph at `path` ((node name, attribute, index) steps from this graph), if it exists and every
    /// node name on the way is unique.
    pub fn subgraph_at(&self, path: &[(String, String, usize)]) -> Option<&Graph> {
        let Some(((node, attr, index), rest)) = path.split_first() else {
            return Some(self);
        };
        let mut found = self.nodes().filter(|(_, n)| n.name == *node);
        let (_, n) = found.next()?;
        if found.next().is_some() {
            return None; // the name does not say which node
        }
        let a = n.attributes().iter().find(|a| a.name() == attr)?;
        a.subgraphs().get(*index)?.subgraph_at(rest)
    }

    /// Applies a patch to the graph at `path` (see [`Graph::subgraph_at`]).
    pub fn apply_at(
        &mut self,
        path: &[(String, String, usize)],
        patch: super::Patch,
    ) -> Result<super::PatchSummary> {
        let Some(((node, attr, index), rest)) = path.split_first() else {
            return self.apply(patch);
        };
        let missing =
            || crate::error::Error::Model(format!("no subgraph {attr}[{index}] of node '{node}'"));
        let found: Vec<NodeId> = self
            .nodes()
            .filter(|(_, n)| n.name == *node)
            .map(|(id, _)| id)
            .collect();
        let [id] = found[..] else {
            return Err(missing());
        };
        self.with_subgraph(id, attr, *index, |g| g.apply_at(rest, patch))?
            .ok_or_else(missing)
    }

    fn refresh_implicit_uses(&mut self, id: NodeId) {
        let now: HashSet<ValueId> = self.implicit_reads(id).collect();
        let implicit = Use {
            node: id,
            slot: Slot::Implicit,
        };
        let stale: Vec<ValueId> = self
            .values()
            .filter(|(v, val)| val.uses.contains(&implicit) && !now.contains(v))
            .map(|(v, _)| v)
            .collect();
        for v in stale {
            self.value_mut(v).uses.retain(|u| *u != implicit);
        }
        for v in now {
            if !self.value(v).uses.contains(&implicit) {
                self.value_mut(v).uses.push(implicit);
            }
        }
    }

    /// Removes a value nothing reads that no node produces: an unused initializer, or an outer value a
    /// subgraph no longer reads. Graph inputs and outputs stay. Returns whether it was removed.
    pub fn remove_unused_value(&mut self, id: ValueId) -> bool {
        let v = self.value(id);
        if !v.uses.is_empty()
            || self.is_output(id)
            || !matches!(v.def, Def::Initializer | Def::Outer)
        {
            return false;
        }
        let name = v.name.clone();
        self.by_name.remove(&name);
        self.values[id.index()] = None;
        self.initializers.retain(|&i| i != id);
        self.sparse_initializers.retain(|&i| i != id);
        true
    }

    /// Reorders nodes into a topological order that keeps the current order where it can.
    pub fn sort_topologically(&mut self) -> std::result::Result<bool, String> {
        let order = self.stable_topological_order(&HashMap::new())?;
        let changed = order != self.order;
        self.order = order;
        Ok(changed)
    }
}
