//! Topological sorting: puts the nodes of every graph in an order where each node follows what it reads,
//! keeping the existing order wherever dependencies allow.

use super::{Pass, PassReport};
use crate::error::{Error, Result};
use crate::ir::{Graph, Model};

pub struct TopologicalSort;

impl Pass for TopologicalSort {
    fn name(&self) -> &'static str {
        "topological-sort"
    }

    fn run(&self, model: &mut Model) -> Result<PassReport> {
        let mut report = PassReport::new(self.name());
        report.changed = sort(&mut model.graph)?;
        if report.changed {
            report.changes.push("reordered nodes".into());
        }
        Ok(report)
    }
}

fn sort(g: &mut Graph) -> Result<bool> {
    let mut changed = false;
    let ids: Vec<_> = g
        .nodes()
        .filter(|(_, n)| n.subgraphs().next().is_some())
        .map(|(id, _)| id)
        .collect();
    for id in ids {
        changed |= g.with_subgraphs(id, sort)?.into_iter().any(|c| c);
    }
    let place = format!("graph '{}'", g.name);
    changed |= g
        .sort_topologically()
        .map_err(|nodes| Error::Cycle { place, nodes })?;
    Ok(changed)
}
