//! Recipes: YAML files that say how each weight site is quantized. The raw serde structs below are
//! compiled once into a [`Recipe`] — a validated policy with parsed patterns — and passes only ever see
//! that. Unknown keys are errors with their line and column; a semantic error names the rule.
//!
//! ```yaml
//! description: int8 per-channel weights everywhere
//! defaults: { bits: 8, granularity: channel, symmetric: true }
//! rules:                      # first match wins
//!   - match: { op: [Gather] }
//!     scheme: { granularity: tensor }
//!   - match: { weight: "*lm_head*" }
//!     skip: true
//! ```
//!
//! A rule's `match` may name op types (`op`), node-name and weight-name glob patterns (`node`, `weight`;
//! `*` and `?`), element-count bounds (`min_elements`, `max_elements`) and `subgraph: true|false`; every
//! condition given must hold. Its action is `skip: true` or a `scheme` whose keys override the defaults.

use std::path::Path;

use serde::Deserialize;

use crate::passes::quantize_weights::{Decision, SiteInfo, WeightPolicy};
use crate::quant::int::{Granularity, IntScheme};

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct SchemeSpec {
    pub bits: Option<u32>,
    pub format: Option<String>,
    pub granularity: Option<String>,
    pub block: Option<usize>,
    pub symmetric: Option<bool>,
    pub clip_search: Option<bool>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    pub op: Option<Vec<String>>,
    pub node: Option<String>,
    pub weight: Option<String>,
    pub min_elements: Option<u64>,
    pub max_elements: Option<u64>,
    pub subgraph: Option<bool>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(rename = "match", default)]
    pub matcher: MatchSpec,
    #[serde(default)]
    pub skip: bool,
    pub scheme: Option<SchemeSpec>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    #[serde(default)]
    pub description: String,
    pub defaults: SchemeSpec,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

/// A compiled rule.
#[derive(Debug, Clone)]
struct Rule {
    index: usize,
    matcher: MatchSpec,
    action: Option<IntScheme>,
}

/// A validated recipe: the policy passes apply.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub name: String,
    pub description: String,
    pub defaults: IntScheme,
    rules: Vec<Rule>,
}

/// The built-in recipes (the YAML files of the top-level passes/ folder, compiled in).
pub const BUILTIN: &[(&str, &str)] = &[
    ("w8", include_str!("../../passes/w8.yaml")),
    ("w4", include_str!("../../passes/w4.yaml")),
];

fn scheme(spec: &SchemeSpec, base: Option<&IntScheme>, place: &str) -> Result<IntScheme, String> {
    if let Some(f) = &spec.format
        && f != "int"
    {
        return Err(format!(
            "{place}: format '{f}' is not available (this version quantizes format: int)"
        ));
    }
    let bits = spec
        .bits
        .or(base.map(|b| b.bits))
        .ok_or_else(|| format!("{place}: bits is required"))?;
    let granularity = match (spec.granularity.as_deref(), spec.block) {
        (Some("tensor"), None) => Granularity::PerTensor,
        (Some("channel"), None) => Granularity::PerChannel,
        (Some("block"), Some(b)) => Granularity::Block(b),
        (Some("block"), None) => {
            return Err(format!("{place}: granularity block needs `block: N`"));
        }
        (Some(g @ ("tensor" | "channel")), Some(_)) => {
            return Err(format!(
                "{place}: `block` goes with granularity block, not {g}"
            ));
        }
        (Some(other), _) => {
            return Err(format!(
                "{place}: granularity '{other}' is not one of tensor, channel, block"
            ));
        }
        (None, Some(b)) => Granularity::Block(b),
        (None, None) => base
            .map(|b| b.granularity)
            .unwrap_or(Granularity::PerChannel),
    };
    let s = IntScheme {
        bits,
        symmetric: spec.symmetric.or(base.map(|b| b.symmetric)).unwrap_or(true),
        granularity,
        clip_search: spec
            .clip_search
            .or(base.map(|b| b.clip_search))
            .unwrap_or(false),
    };
    s.validate().map_err(|e| format!("{place}: {e}"))?;
    Ok(s)
}

/// Glob match with `*` (any run) and `?` (one character).
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

impl Recipe {
    /// Parses and validates recipe YAML; `name` is used in messages.
    pub fn parse(name: &str, text: &str) -> Result<Recipe, String> {
        let file: RecipeFile = serde_yaml::from_str(text).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!(" at line {}, column {}", l.line(), l.column()))
                .unwrap_or_default();
            format!("recipe {name}{at}: {e}")
        })?;
        let defaults = scheme(&file.defaults, None, &format!("recipe {name}: defaults"))?;
        let rules = file
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let place = format!("recipe {name}: rules[{i}]");
                let action = match (r.skip, &r.scheme) {
                    (true, None) => None,
                    (false, Some(s)) => Some(scheme(s, Some(&defaults), &place)?),
                    (true, Some(_)) => {
                        return Err(format!("{place}: `skip: true` and a `scheme` contradict"));
                    }
                    (false, None) => {
                        return Err(format!("{place}: give `skip: true` or a `scheme`"));
                    }
                };
                if let (Some(lo), Some(hi)) = (r.matcher.min_elements, r.matcher.max_elements)
                    && lo > hi
                {
                    return Err(format!("{place}: min_elements {lo} > max_elements {hi}"));
                }
                Ok(Rule {
                    index: i,
                    matcher: r.matcher.clone(),
                    action,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Recipe {
            name: name.to_string(),
            description: file.description,
            defaults,
            rules,
        })
    }

    /// A built-in recipe by name, or a YAML file.
    pub fn load(name_or_path: &str) -> Result<Recipe, String> {
        if let Some((name, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Recipe::parse(name, text);
        }
        let path = Path::new(name_or_path);
        if !path.is_file() {
            let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "recipe '{name_or_path}' is neither a built-in recipe ({}) nor a file",
                names.join(", ")
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read recipe {}: {e}", path.display()))?;
        Recipe::parse(&path.display().to_string(), &text)
    }

    fn matches(m: &MatchSpec, site: &SiteInfo) -> bool {
        m.op.as_ref().is_none_or(|ops| {
            site.consumers
                .iter()
                .any(|(_, op)| ops.iter().any(|o| o == op))
        }) && m
            .node
            .as_ref()
            .is_none_or(|p| site.consumers.iter().any(|(n, _)| glob(p, n)))
            && m.weight.as_ref().is_none_or(|p| glob(p, site.weight))
            && m.min_elements.is_none_or(|lo| site.elements >= lo)
            && m.max_elements.is_none_or(|hi| site.elements <= hi)
            && m.subgraph.is_none_or(|s| s == site.in_subgraph)
    }
}

impl WeightPolicy for Recipe {
    fn decide(&self, site: &SiteInfo) -> Decision {
        for r in &self.rules {
            if Recipe::matches(&r.matcher, site) {
                return match r.action {
                    Some(s) => Decision::Quantize(s),
                    None => {
                        Decision::Skip(format!("recipe {} rules[{}]: skip", self.name, r.index))
                    }
                };
            }
        }
        Decision::Quantize(self.defaults)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site<'a>(
        weight: &'a str,
        consumers: Vec<(&'a str, &'a str)>,
        elements: u64,
    ) -> SiteInfo<'a> {
        SiteInfo {
            weight,
            consumers,
            elements,
            in_subgraph: false,
        }
    }

    #[test]
    fn first_matching_rule_wins_and_overrides_defaults() {
        let r = Recipe::parse(
            "t",
            "defaults: { bits: 8, granularity: channel }\nrules:\n  - match: { op: [Gather] }\n    scheme: { granularity: tensor, symmetric: false }\n  - match: { weight: '*head*' }\n    skip: true\n  - match: { max_elements: 100 }\n    skip: true\n",
        )
        .unwrap();
        let emb = r.decide(&site("emb", vec![("g", "Gather")], 1000));
        assert_eq!(
            emb,
            Decision::Quantize(IntScheme {
                bits: 8,
                symmetric: false,
                granularity: Granularity::PerTensor,
                clip_search: false
            })
        );
        assert!(
            matches!(r.decide(&site("lm_head.w", vec![("m", "MatMul")], 1000)), Decision::Skip(s) if s.contains("rules[1]"))
        );
        assert!(matches!(
            r.decide(&site("small", vec![("m", "MatMul")], 10)),
            Decision::Skip(_)
        ));
        assert_eq!(
            r.decide(&site("w", vec![("m", "MatMul")], 1000)),
            Decision::Quantize(r.defaults)
        );
    }

    #[test]
    fn errors_name_the_place() {
        let e = Recipe::parse(
            "t",
            "defaults: { bits: 8 }\nrules:\n  - match: { opp: [Conv] }\n    skip: true\n",
        )
        .unwrap_err();
        assert!(e.contains("line 3") && e.contains("opp"), "{e}");
        let e = Recipe::parse("t", "defaults: { bits: 12 }\n").unwrap_err();
        assert!(e.contains("defaults") && e.contains("bits"), "{e}");
        let e = Recipe::parse("t", "defaults: { bits: 8 }\nrules:\n  - match: {}\n").unwrap_err();
        assert!(e.contains("rules[0]"), "{e}");
        let e = Recipe::parse("t", "defaults: { bits: 8, granularity: blok }\n").unwrap_err();
        assert!(e.contains("blok"), "{e}");
        assert!(Recipe::load("no-such-recipe").unwrap_err().contains("w8"));
    }

    #[test]
    fn globs() {
        assert!(glob("*q_proj*", "/layers.0/self_attn/q_proj/MatMul"));
        assert!(glob("a?c", "abc") && !glob("a?c", "abbc"));
        assert!(glob("*", "") && glob("**x", "x") && !glob("x*", "yx"));
    }

    #[test]
    fn every_builtin_recipe_compiles() {
        for (name, text) in BUILTIN {
            Recipe::parse(name, text).unwrap();
        }
    }
}
