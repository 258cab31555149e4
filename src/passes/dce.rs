//! Dead-node elimination: removes nodes none of whose outputs is read or is a graph output, then
//! initializers nothing reads, in the main graph and every subgraph, to a fixpoint.

use super::{Pass, PassReport};
use crate::error::Result;
use crate::ir::{Graph, Model, Patch};

pub struct DeadNodeElimination;

impl Pass for DeadNodeElimination {
    fn name(&self) -> &'static str {
        "dead-node-elimination"
    }

    fn run(&self, model: &mut Model) -> Result<PassReport> {
        let mut report = PassReport::new(self.name());
        let (nodes, values) = sweep(&mut model.graph, self.name())?;
        report.changed = nodes + values > 0;
        if report.changed {
            report.changes.push(format!(
                "removed {nodes} nodes and {values} unused constants"
            ));
        }
        Ok(report)
    }
}

fn sweep(g: &mut Graph, origin: &str) -> Result<(usize, usize)> {
    let (mut nodes, mut values) = (0, 0);
    let with_subgraphs: Vec<_> = g
        .nodes()
        .filter(|(_, n)| n.subgraphs().next().is_some())
        .map(|(id, _)| id)
        .collect();
    for id in with_subgraphs {
        for (n, v) in g.with_subgraphs(id, |sub| sweep(sub, origin))? {
            nodes += n;
            values += v;
        }
    }
    loop {
        let dead: Vec<_> = g
            .nodes()
            .filter(|(_, n)| {
                n.outputs()
                    .iter()
                    .flatten()
                    .all(|&v| g.value(v).uses().is_empty() && !g.is_output(v))
            })
            .map(|(id, _)| id)
            .collect();
        if dead.is_empty() {
            break;
        }
        let mut patch = Patch::new(origin);
        for &id in &dead {
            patch.remove_node(id);
        }
        nodes += g.apply(patch)?.nodes_removed;
    }
    let unused: Vec<_> = g.values().map(|(id, _)| id).collect();
    for id in unused {
        if g.remove_unused_value(id) {
            values += 1;
        }
    }
    Ok((nodes, values))
}
