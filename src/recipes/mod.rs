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
//! A rule's `match` may name op types (`op`), roles (`role`: attention, ffn, embedding, head, conv,
//! other), node-name and weight-name patterns (`node`, `weight`: globs with `*` and `?`, or `re:` and a
//! regular expression), element-count bounds (`min_elements`, `max_elements`) and
//! `subgraph: true|false`; every condition given must hold. Its action is `skip: true` or a `scheme`
//! whose keys override the defaults: `format` (int, nf4, fp4, vq), `bits`, `granularity` (tensor, channel,
//! block) and `block`, `symmetric`, `clip_search`, `double_quant`, `dead_zone` (`{ width: W }` in
//! quantization steps or `{ sparsity: S }`) and `outliers` (`{ fraction: F }` or `{ threshold: T }` in
//! standard deviations of the channel). `format: vq` takes instead `dim` (values per piece), `codebook_size`,
//! `stages` (residual), `subspaces` (product), `importance` (calibration, none), `iterations`, `seed`
//! and `outliers`; scalar keys with it are errors, and so are its keys with other formats.
//!
//! An optional `activations:` section makes MatMul/Gemm/Conv compute on integers:
//!
//! ```yaml
//! activations:
//!   mode: static              # or dynamic (no calibration)
//!   ops: [MatMul, Gemm, Conv]
//!   method: percentile        # minmax, percentile, entropy, mse (static)
//!   percentile: 99.999
//!   symmetric: false          # u8 with zero point 128 when true
//!   outputs: [Conv]           # op types whose outputs are quantized too (static)
//!   activation_matmul: false  # also MatMuls of two activations
//!   exclude: [ { op: [Gemm], node: "*head*", tensor: "re:...", role: [head], position: last } ]
//!   fallback: { sqnr_db: 20, weight_sqnr_db: 30, cosine: 0.995, top1: 0.998 }
//!   saturation: fix           # or ignore
//! ```

use std::path::Path;

use serde::Deserialize;

use crate::calib::Method;
use crate::passes::quantize_activations::{
    ActivationPolicy, Exclusion, Mode, Position, Saturation,
};
use crate::passes::quantize_weights::{Decision, SiteInfo, WeightPolicy};
use crate::passes::roles::Role;
use crate::quant::int::Granularity;
use crate::quant::scheme::{DeadZone, Format, WeightScheme};
use crate::quant::sparse::OutlierRule;
use crate::quant::vq::{Importance, VqScheme};

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct SchemeSpec {
    pub bits: Option<u32>,
    pub format: Option<String>,
    pub granularity: Option<String>,
    pub block: Option<usize>,
    pub symmetric: Option<bool>,
    pub clip_search: Option<bool>,
    pub double_quant: Option<bool>,
    pub dead_zone: Option<DeadZoneSpec>,
    pub outliers: Option<OutlierSpec>,
    /// Format vq: values per piece.
    pub dim: Option<usize>,
    /// Format vq: entries per codebook.
    pub codebook_size: Option<usize>,
    /// Format vq: residual stages.
    pub stages: Option<usize>,
    /// Format vq: product subspaces along the reduction axis.
    pub subspaces: Option<usize>,
    /// Format vq: calibration or none.
    pub importance: Option<String>,
    /// Format vq: most Lloyd iterations.
    pub iterations: Option<usize>,
    /// Format vq: the k-means seed.
    pub seed: Option<u64>,
}

/// `dead_zone: { width: W }` (half-width in quantization steps) or `{ sparsity: S }`; `{}` clears an
/// inherited one.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct DeadZoneSpec {
    pub width: Option<f32>,
    pub sparsity: Option<f64>,
}

/// `outliers: { fraction: F }` (largest magnitudes of the tensor) or `{ threshold: T }` (standard
/// deviations from the channel mean); `{}` clears inherited ones.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct OutlierSpec {
    pub fraction: Option<f64>,
    pub threshold: Option<f64>,
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
    /// Roles guessed from names and ops: attention, ffn, embedding, head, conv, other.
    pub role: Option<Vec<String>>,
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
    pub activations: Option<ActivationSpec>,
}

/// The `activations:` section: integer activations for MatMul/Gemm/Conv.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct ActivationSpec {
    /// static (calibrated) or dynamic.
    pub mode: Option<String>,
    pub ops: Option<Vec<String>>,
    /// minmax, percentile, entropy, mse.
    pub method: Option<String>,
    pub percentile: Option<f64>,
    pub symmetric: Option<bool>,
    /// Op types whose outputs are quantized too.
    pub outputs: Option<Vec<String>>,
    pub activation_matmul: Option<bool>,
    #[serde(default)]
    pub exclude: Vec<ExcludeSpec>,
    pub fallback: Option<FallbackSpec>,
    /// fix or ignore.
    pub saturation: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct ExcludeSpec {
    pub op: Option<Vec<String>>,
    pub node: Option<String>,
    pub tensor: Option<String>,
    pub role: Option<Vec<String>>,
    /// first or last (among the sites found).
    pub position: Option<String>,
}

/// `fallback: { sqnr_db: S, weight_sqnr_db: W, cosine: C, top1: T }`: tensors below S dB of their own
/// SQNR stay float, and sites whose int8 weight is below W dB;
/// then the output cosine on the calibration data must reach C, and the top-1 agreement of outputs
/// that look like class scores T (an omitted floor is not checked).
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct FallbackSpec {
    pub sqnr_db: Option<f64>,
    pub weight_sqnr_db: Option<f64>,
    pub cosine: Option<f64>,
    pub top1: Option<f64>,
}

/// A compiled rule.
#[derive(Debug, Clone)]
struct Rule {
    index: usize,
    matcher: MatchSpec,
    node: Option<Pattern>,
    weight: Option<Pattern>,
    roles: Option<Vec<Role>>,
    action: Option<WeightScheme>,
}

/// A validated recipe: the policy passes apply.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub name: String,
    pub description: String,
    pub defaults: WeightScheme,
    rules: Vec<Rule>,
    /// Integer activations, when the recipe asks for them.
    pub activations: Option<ActivationPolicy>,
}

/// The built-in recipes (the YAML files of the top-level passes/ folder, compiled in).
pub const BUILTIN: &[(&str, &str)] = &[
    ("w8", include_str!("../../passes/w8.yaml")),
    ("w4", include_str!("../../passes/w4.yaml")),
    ("nf4", include_str!("../../passes/nf4.yaml")),
    ("fp4", include_str!("../../passes/fp4.yaml")),
    ("w8a8", include_str!("../../passes/w8a8.yaml")),
    ("dynamic", include_str!("../../passes/dynamic.yaml")),
    ("vq2", include_str!("../../passes/vq2.yaml")),
    ("vq3", include_str!("../../passes/vq3.yaml")),
];

fn scheme(
    spec: &SchemeSpec,
    base: Option<&WeightScheme>,
    place: &str,
) -> Result<WeightScheme, String> {
    let format = match spec.format.as_deref() {
        None => base.map_or(Format::Int, |b| b.format),
        Some("int") => Format::Int,
        Some("nf4") => Format::Nf4,
        Some("fp4") => Format::Fp4,
        Some("vq") => Format::Vq,
        Some(f) => {
            return Err(format!(
                "{place}: format '{f}' is not one of int, nf4, fp4, vq"
            ));
        }
    };
    let outliers = match &spec.outliers {
        None => base.and_then(|b| b.outliers),
        Some(o) => match (o.fraction, o.threshold) {
            (None, None) => None,
            (Some(f), None) => Some(OutlierRule::TopFraction(f)),
            (None, Some(t)) => Some(OutlierRule::StdThreshold(t)),
            (Some(_), Some(_)) => {
                return Err(format!(
                    "{place}: outliers takes fraction or threshold, not both"
                ));
            }
        },
    };
    if format == Format::Vq {
        return vq_scheme(spec, base, outliers, place);
    }
    let vq_keys = [
        ("dim", spec.dim.is_some()),
        ("codebook_size", spec.codebook_size.is_some()),
        ("stages", spec.stages.is_some()),
        ("subspaces", spec.subspaces.is_some()),
        ("importance", spec.importance.is_some()),
        ("iterations", spec.iterations.is_some()),
        ("seed", spec.seed.is_some()),
    ];
    if let Some((key, _)) = vq_keys.iter().find(|(_, given)| *given) {
        return Err(format!("{place}: `{key}` goes with format vq"));
    }
    let table = format != Format::Int;
    let bits = match spec.bits {
        Some(b) => b,
        None if table => 4,
        None => base
            .map(|b| b.bits)
            .ok_or_else(|| format!("{place}: bits is required"))?,
    };
    let format_changed = spec.format.is_some() && base.is_some_and(|b| b.format != format);
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
        // NF4/FP4 default to bitsandbytes' blocks of 64.
        (None, None) if table && (format_changed || base.is_none()) => Granularity::Block(64),
        (None, None) => base.map_or(Granularity::PerChannel, |b| b.granularity),
    };
    let inherit = |f: fn(&WeightScheme) -> bool, default: bool| base.map_or(default, f);
    let s = WeightScheme {
        format,
        bits,
        symmetric: spec
            .symmetric
            .unwrap_or(table || inherit(|b| b.symmetric, true)),
        granularity,
        clip_search: spec
            .clip_search
            .unwrap_or(inherit(|b| b.clip_search, false)),
        double_quant: spec
            .double_quant
            .unwrap_or(inherit(|b| b.double_quant, false)),
        dead_zone: match &spec.dead_zone {
            None => base.and_then(|b| b.dead_zone).filter(|_| !table),
            Some(d) => match (d.width, d.sparsity) {
                (None, None) => None,
                (Some(w), None) => Some(DeadZone::Width(w)),
                (None, Some(f)) => Some(DeadZone::Sparsity(f)),
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "{place}: dead_zone takes width or sparsity, not both"
                    ));
                }
            },
        },
        outliers,
        vq: None,
    };
    s.validate().map_err(|e| format!("{place}: {e}"))?;
    Ok(s)
}

/// Format vq: codebook keys over the inherited (or default) VQ parameters; scalar keys are errors.
fn vq_scheme(
    spec: &SchemeSpec,
    base: Option<&WeightScheme>,
    outliers: Option<OutlierRule>,
    place: &str,
) -> Result<WeightScheme, String> {
    let scalar_keys = [
        ("bits", spec.bits.is_some()),
        ("granularity", spec.granularity.is_some()),
        ("block", spec.block.is_some()),
        ("symmetric", spec.symmetric.is_some()),
        ("clip_search", spec.clip_search.is_some()),
        ("double_quant", spec.double_quant.is_some()),
        ("dead_zone", spec.dead_zone.is_some()),
    ];
    if let Some((key, _)) = scalar_keys.iter().find(|(_, given)| *given) {
        return Err(format!(
            "{place}: `{key}` does not apply to format vq (its keys: dim, codebook_size, stages, \
             subspaces, importance, iterations, seed, outliers)"
        ));
    }
    let b = base.and_then(|b| b.vq).unwrap_or_default();
    let importance = match spec.importance.as_deref() {
        None => b.importance,
        Some("calibration") => Importance::Calibration,
        Some("none") => Importance::None,
        Some(other) => {
            return Err(format!(
                "{place}: importance '{other}' is not one of calibration, none"
            ));
        }
    };
    let v = VqScheme {
        dim: spec.dim.unwrap_or(b.dim),
        codebook_size: spec.codebook_size.unwrap_or(b.codebook_size),
        stages: spec.stages.unwrap_or(b.stages),
        subspaces: spec.subspaces.unwrap_or(b.subspaces),
        importance,
        iterations: spec.iterations.unwrap_or(b.iterations),
        seed: spec.seed.unwrap_or(b.seed),
        outliers,
    };
    let s = WeightScheme::vq(v);
    s.validate().map_err(|e| format!("{place}: {e}"))?;
    Ok(s)
}

fn activation_policy(a: &ActivationSpec, place: &str) -> Result<ActivationPolicy, String> {
    let mode = match a.mode.as_deref() {
        None | Some("static") => Mode::Static,
        Some("dynamic") => Mode::Dynamic,
        Some(m) => return Err(format!("{place}: mode '{m}' is not one of static, dynamic")),
    };
    let mut p = ActivationPolicy {
        mode,
        ..Default::default()
    };
    if let Some(ops) = &a.ops {
        for o in ops {
            if !matches!(o.as_str(), "MatMul" | "Gemm" | "Conv") {
                return Err(format!(
                    "{place}: ops: '{o}' cannot take integer activations (MatMul, Gemm, Conv can)"
                ));
            }
        }
        p.ops = ops.clone();
    }
    if a.method.is_some() || a.percentile.is_some() {
        let name = a.method.as_deref().unwrap_or("percentile");
        if a.percentile.is_some() && name != "percentile" {
            return Err(format!("{place}: `percentile` goes with method percentile"));
        }
        p.method = Method::parse(name, a.percentile).map_err(|e| format!("{place}: {e}"))?;
    }
    if p.mode == Mode::Dynamic && (a.method.is_some() || a.outputs.is_some()) {
        return Err(format!(
            "{place}: dynamic mode computes ranges at run time; `method` and `outputs` are for static"
        ));
    }
    p.symmetric = a.symmetric.unwrap_or(false);
    if let Some(o) = &a.outputs {
        p.outputs = o.clone();
    }
    if p.mode == Mode::Dynamic {
        p.outputs.clear();
    }
    p.activation_matmul = a.activation_matmul.unwrap_or(false);
    if let Some(f) = &a.fallback {
        if let Some(s) = f.sqnr_db {
            p.min_sqnr_db = s;
        }
        if let Some(s) = f.weight_sqnr_db {
            p.min_weight_sqnr_db = s;
        }
        p.min_cosine = f.cosine;
        p.min_top1 = f.top1;
        for (k, v) in [("cosine", f.cosine), ("top1", f.top1)] {
            if let Some(c) = v
                && !(0.0..=1.0).contains(&c)
            {
                return Err(format!(
                    "{place}: fallback {k} must be within 0..=1, got {c}"
                ));
            }
        }
    }
    p.saturation = match a.saturation.as_deref() {
        None | Some("fix") => Saturation::Fix,
        Some("ignore") => Saturation::Ignore,
        Some(s) => {
            return Err(format!(
                "{place}: saturation '{s}' is not one of fix, ignore"
            ));
        }
    };
    for (i, e) in a.exclude.iter().enumerate() {
        let at = format!("{place}: exclude[{i}]");
        let pat = |x: &Option<String>| x.as_deref().map(|x| Pattern::parse(x, &at)).transpose();
        p.exclude.push(Exclusion {
            ops: e.op.clone(),
            node: pat(&e.node)?,
            tensor: pat(&e.tensor)?,
            roles: e
                .role
                .as_ref()
                .map(|rs| {
                    rs.iter()
                        .map(|r| r.parse::<Role>())
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()
                .map_err(|err| format!("{at}: {err}"))?,
            position: match e.position.as_deref() {
                None => None,
                Some("first") => Some(Position::First),
                Some("last") => Some(Position::Last),
                Some(x) => return Err(format!("{at}: position '{x}' is not one of first, last")),
            },
            origin: at.clone(),
        });
    }
    Ok(p)
}

/// A name pattern: a glob (`*` any run, `?` one character) or, written `re:…`, a regular expression
/// searched anywhere in the name.
#[derive(Debug, Clone)]
pub enum Pattern {
    Glob(String),
    Regex(regex::Regex),
}

impl Pattern {
    pub fn parse(p: &str, place: &str) -> Result<Pattern, String> {
        match p.strip_prefix("re:") {
            Some(r) => regex::Regex::new(r)
                .map(Pattern::Regex)
                .map_err(|e| format!("{place}: bad regular expression '{r}': {e}")),
            None => Ok(Pattern::Glob(p.to_string())),
        }
    }

    pub fn matches(&self, text: &str) -> bool {
        match self {
            Pattern::Glob(g) => glob(g, text),
            Pattern::Regex(r) => r.is_match(text),
        }
    }
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
                let roles = r
                    .matcher
                    .role
                    .as_ref()
                    .map(|rs| {
                        rs.iter()
                            .map(|x| x.parse::<Role>())
                            .collect::<Result<Vec<_>, _>>()
                    })
                    .transpose()
                    .map_err(|e| format!("{place}: {e}"))?;
                let pattern = |p: &Option<String>| {
                    p.as_deref().map(|p| Pattern::parse(p, &place)).transpose()
                };
                Ok(Rule {
                    index: i,
                    matcher: r.matcher.clone(),
                    node: pattern(&r.matcher.node)?,
                    weight: pattern(&r.matcher.weight)?,
                    roles,
                    action,
                })
            })
            .collect::<Result<_, String>>()?;
        let activations = file
            .activations
            .as_ref()
            .map(|a| activation_policy(a, &format!("recipe {name}: activations")))
            .transpose()?;
        Ok(Recipe {
            name: name.to_string(),
            description: file.description,
            defaults,
            rules,
            activations,
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

    fn matches(r: &Rule, site: &SiteInfo) -> bool {
        let m = &r.matcher;
        r.roles.as_ref().is_none_or(|rs| rs.contains(&site.role))
            && m.op.as_ref().is_none_or(|ops| {
                site.consumers
                    .iter()
                    .any(|(_, op)| ops.iter().any(|o| o == op))
            })
            && r.node
                .as_ref()
                .is_none_or(|p| site.consumers.iter().any(|(n, _)| p.matches(n)))
            && r.weight.as_ref().is_none_or(|p| p.matches(site.weight))
            && m.min_elements.is_none_or(|lo| site.elements >= lo)
            && m.max_elements.is_none_or(|hi| site.elements <= hi)
            && m.subgraph.is_none_or(|s| s == site.in_subgraph)
    }
}

impl WeightPolicy for Recipe {
    fn decide(&self, site: &SiteInfo) -> Decision {
        for r in &self.rules {
            if Recipe::matches(r, site) {
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
            role: crate::passes::roles::classify(weight, &[]),
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
            Decision::Quantize(WeightScheme::int(8, false, Granularity::PerTensor, false))
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
    fn table_formats_roles_and_side_paths() {
        let r = Recipe::parse(
            "t",
            "defaults: { bits: 8, granularity: channel }\nrules:\n  - match: { role: [ffn] }\n    scheme: { format: nf4, double_quant: true }\n  - match: { role: [attention] }\n    scheme: { bits: 4, block: 32, outliers: { threshold: 6.0 }, dead_zone: { width: 0.8 } }\n",
        )
        .unwrap();
        let ffn = SiteInfo {
            role: Role::Ffn,
            ..site("w", vec![("/mlp/fc1/MatMul", "MatMul")], 1000)
        };
        let Decision::Quantize(s) = r.decide(&ffn) else {
            panic!()
        };
        assert_eq!(
            (s.format, s.bits, s.granularity, s.double_quant, s.symmetric),
            (Format::Nf4, 4, Granularity::Block(64), true, true)
        );
        let attn = SiteInfo {
            role: Role::Attention,
            ..ffn.clone()
        };
        let Decision::Quantize(s) = r.decide(&attn) else {
            panic!()
        };
        assert_eq!(s.outliers, Some(OutlierRule::StdThreshold(6.0)));
        assert_eq!(s.dead_zone, Some(DeadZone::Width(0.8)));
        assert_eq!(s.granularity, Granularity::Block(32));
        let e = Recipe::parse("t", "defaults: { format: nf4, bits: 3 }\n").unwrap_err();
        assert!(e.contains("4-bit"), "{e}");
        let e = Recipe::parse(
            "t",
            "defaults: { bits: 8 }\nrules:\n  - match: { role: [mlp] }\n    skip: true\n",
        )
        .unwrap_err();
        assert!(e.contains("rules[0]") && e.contains("mlp"), "{e}");
        let e = Recipe::parse("t", "defaults: { bits: 4, dead_zone: { wdth: 1 } }\n").unwrap_err();
        assert!(e.contains("wdth"), "{e}");
    }

    #[test]
    fn regex_patterns() {
        let r = Recipe::parse(
            "t",
            "defaults: { bits: 8 }\nrules:\n  - match: { node: 're:layers\\.(1|3)\\.' }\n    skip: true\n",
        )
        .unwrap();
        let at = |n: &'static str| site("w", vec![(n, "MatMul")], 1000);
        assert!(matches!(
            r.decide(&at("model.layers.3.mlp")),
            Decision::Skip(_)
        ));
        assert!(matches!(
            r.decide(&at("model.layers.2.mlp")),
            Decision::Quantize(_)
        ));
        let e = Recipe::parse(
            "t",
            "defaults: { bits: 8 }\nrules:\n  - match: { weight: 're:(' }\n    skip: true\n",
        )
        .unwrap_err();
        assert!(
            e.contains("rules[0]") && e.contains("regular expression"),
            "{e}"
        );
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
