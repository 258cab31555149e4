//! The name authority: every value and node name used anywhere in a model (subgraphs included), and
//! fresh, deterministic names for what passes add.

use std::collections::HashSet;

use super::graph::Graph;

#[derive(Clone, Debug, Default)]
pub struct Names {
    taken: HashSet<String>,
}

impl Names {
    pub fn of_graph(g: &Graph) -> Names {
        let mut names = Names::default();
        names.add_graph(g);
        names
    }

    fn add_graph(&mut self, g: &Graph) {
        for (_, v) in g.values() {
            self.taken.insert(v.name.clone());
        }
        for (_, n) in g.nodes() {
            if !n.name.is_empty() {
                self.taken.insert(n.name.clone());
            }
            for sub in n.subgraphs() {
                self.add_graph(sub);
            }
        }
    }

    pub fn is_taken(&self, name: &str) -> bool {
        self.taken.contains(name)
    }

    /// Reserves `base` if it is free, else the first free `base_1`, `base_2`, ….
    pub fn fresh(&mut self, base: &str) -> String {
        let base = if base.is_empty() { "quench" } else { base };
        if self.taken.insert(base.to_string()) {
            return base.to_string();
        }
        let mut i = 1usize;
        loop {
            let candidate = format!("{base}_{i}");
            if self.taken.insert(candidate.clone()) {
                return candidate;
            }
            i += 1;
        }
    }

    /// Marks a name as used (for names that enter the model by other means).
    pub fn reserve(&mut self, name: &str) -> bool {
        self.taken.insert(name.to_string())
    }
}
