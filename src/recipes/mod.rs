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
//! block) and `block`, `symmetric`, `clip_search`, `double_quant`, `gptq` (error-compensating
//! rounding against the input Hessian of `--calib` data; round to nearest without it), `dead_zone` (`{ width: W }` in
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
//!   saturation: fix           # strict (any u8 input, not only the calibration data's codes) or ignore
//!   smooth: auto              # move input-channel ranges into the weights: auto, false or α (needs --calib)
//!   gptq: true                # int8 weight codes by error feedback from the calibration data
//!   fold: true                # fold BatchNormalization / per-channel Mul, Add after a Conv into it,
//!                             # and hard-swish chains (Add, Clip, Mul, Div) into HardSigmoid · x
//!   conv_integer: false       # dynamic: ConvInteger for onnxruntime too (slower than fp32 there)
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::calib::Method;
use crate::passes::quantize_activations::smooth::Strength;
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
    /// Error-compensating rounding from the calibration data's input Hessian (scalar formats).
    pub gptq: Option<bool>,
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
    /// With an `allocate:` section: the schemes of the menu the allocator may choose from here.
    pub menu: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    #[serde(default)]
    pub description: String,
    /// Required, except with `allocate:` (where sites no rule pins are the allocator's).
    pub defaults: Option<SchemeSpec>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    pub activations: Option<ActivationSpec>,
    pub allocate: Option<AllocateSpec>,
    pub floors: Option<Floors>,
}

/// `floors:`: the retention a model built from the recipe must keep on the verification data (the
/// worst output's cosine, its SQNR in dB, the lowest top-1 agreement of class-score outputs). A
/// weight-only model that misses them is shielded: its costliest sites are promoted until they hold.
#[derive(Debug, Deserialize, Serialize, Clone, Copy, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Floors {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cosine: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqnr_db: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1: Option<f64>,
    /// The lowest similarity-ranking agreement of embedding outputs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f64>,
    /// The lowest share of sequences decoded alike.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence: Option<f64>,
}

/// The `allocate:` section: per-site schemes chosen from a menu by measured sensitivity, to a
/// retention target or a bits-per-weight budget (one of the two).
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct AllocateSpec {
    /// cosine, sqnr (dB), top1, similarity or sequence.
    pub metric: Option<String>,
    pub target_retention: Option<f64>,
    pub bits_per_weight: Option<f64>,
    /// Names of [`MENU`] schemes (default [`DEFAULT_MENU`]).
    pub menu: Option<Vec<String>>,
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
    /// Smoothing: `auto` or a strength α in (0, 1) (static).
    pub smooth: Option<serde_yaml::Value>,
    /// Error-compensating rounding of the int8 weights (needs calibration data).
    pub gptq: Option<bool>,
    /// Fold per-channel affine ops after a Conv into its weight and bias first.
    pub fold: Option<bool>,
    /// Dynamic mode: ConvInteger for onnxruntime targets too.
    pub conv_integer: Option<bool>,
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
    action: Action,
}

#[derive(Debug, Clone)]
enum Action {
    Skip,
    Scheme(WeightScheme),
    /// Menu positions the allocator may choose from.
    Menu(Vec<usize>),
}

/// What the allocator optimises and how much it may spend.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocate {
    pub metric: Metric,
    pub goal: Goal,
    pub menu: Vec<MenuEntry>,
}

/// The retention figure an allocation is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// The lowest output cosine.
    Cosine,
    /// The lowest output SQNR, dB.
    Sqnr,
    /// The lowest top-1 agreement of outputs that look like class scores.
    Top1,
    /// The lowest similarity-ranking agreement of embedding outputs (Spearman over row pairs).
    Similarity,
    /// The lowest share of sequences decoded alike (CTC greedy) of per-step score outputs.
    Sequence,
}

impl std::str::FromStr for Metric {
    type Err = String;
    fn from_str(s: &str) -> Result<Metric, String> {
        match s {
            "cosine" => Ok(Metric::Cosine),
            "sqnr" => Ok(Metric::Sqnr),
            "top1" => Ok(Metric::Top1),
            "similarity" => Ok(Metric::Similarity),
            "sequence" => Ok(Metric::Sequence),
            o => Err(format!(
                "metric '{o}' is not one of cosine, sqnr, top1, similarity, sequence"
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    /// The smallest model whose measured retention reaches this.
    Retention(f64),
    /// The best retention within this many bits per weight.
    BitsPerWeight(f64),
}

/// One scheme the allocator can give a site; `scheme: None` is float.
#[derive(Debug, Clone, PartialEq)]
pub struct MenuEntry {
    pub name: String,
    pub scheme: Option<WeightScheme>,
}

/// The schemes an allocation menu may name, as recipe scheme maps (`float` keeps the weight).
pub const MENU: &[(&str, &str)] = &[
    ("float", ""),
    ("int8", "{ bits: 8, granularity: channel }"),
    (
        "int4",
        "{ bits: 4, granularity: block, block: 32, clip_search: true }",
    ),
    ("nf4", "{ format: nf4 }"),
    (
        "int3",
        "{ bits: 3, granularity: block, block: 64, clip_search: true }",
    ),
    (
        "int2",
        "{ bits: 2, granularity: block, block: 64, clip_search: true }",
    ),
    (
        "vq3",
        "{ format: vq, dim: 8, codebook_size: 256, stages: 3 }",
    ),
    ("vq2", "{ format: vq, dim: 4, codebook_size: 256 }"),
    ("vq1", "{ format: vq, dim: 8, codebook_size: 256 }"),
];

/// The menu when none is given.
pub const DEFAULT_MENU: &[&str] = &["float", "int8", "int4", "nf4", "vq3", "vq2", "vq1"];

/// A menu scheme by name.
pub fn menu_entry(name: &str) -> Result<MenuEntry, String> {
    let Some((n, text)) = MENU.iter().find(|(n, _)| *n == name) else {
        let names: Vec<&str> = MENU.iter().map(|(n, _)| *n).collect();
        return Err(format!(
            "'{name}' is not a menu scheme (one of {})",
            names.join(", ")
        ));
    };
    let scheme = if text.is_empty() {
        None
    } else {
        let spec: SchemeSpec = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        Some(scheme(&spec, None, &format!("menu scheme {n}"))?)
    };
    Ok(MenuEntry {
        name: n.to_string(),
        scheme,
    })
}

/// A list of menu names (duplicates dropped, order kept).
pub fn parse_menu(names: &[String]) -> Result<Vec<MenuEntry>, String> {
    let mut out: Vec<MenuEntry> = Vec::new();
    for n in names {
        let e = menu_entry(n.trim())?;
        if !out.iter().any(|o| o.name == e.name) {
            out.push(e);
        }
    }
    if out.is_empty() {
        return Err("the menu is empty".into());
    }
    Ok(out)
}

/// What a recipe says of a site when an allocator decides the rest.
#[derive(Debug, Clone, PartialEq)]
pub enum Pin {
    /// A rule fixed it (a scheme or float).
    Fixed(Decision),
    /// The allocator chooses among these menu positions.
    Choose(Vec<usize>),
}

fn allocate(a: &AllocateSpec, place: &str) -> Result<Allocate, String> {
    let metric = a
        .metric
        .as_deref()
        .unwrap_or("cosine")
        .parse::<Metric>()
        .map_err(|e| format!("{place}: {e}"))?;
    let goal = match (a.target_retention, a.bits_per_weight) {
        (Some(t), None) => Goal::Retention(t),
        (None, Some(b)) => Goal::BitsPerWeight(b),
        (None, None) => {
            return Err(format!("{place}: give target_retention or bits_per_weight"));
        }
        (Some(_), Some(_)) => {
            return Err(format!(
                "{place}: target_retention and bits_per_weight are alternatives, give one"
            ));
        }
    };
    check_goal(metric, goal).map_err(|e| format!("{place}: {e}"))?;
    let names: Vec<String> = match &a.menu {
        Some(m) => m.clone(),
        None => DEFAULT_MENU.iter().map(|s| s.to_string()).collect(),
    };
    let menu = parse_menu(&names).map_err(|e| format!("{place}: menu: {e}"))?;
    Ok(Allocate { metric, goal, menu })
}

/// A goal that can be met at all: cosine and top-1 in (0, 1], SQNR in dB, bits per weight in (0, 32].
pub fn check_goal(metric: Metric, goal: Goal) -> Result<(), String> {
    match goal {
        Goal::Retention(t) if metric != Metric::Sqnr && !(t > 0.0 && t <= 1.0) => {
            Err(format!("a {metric:?} target must be in (0, 1], got {t}").to_lowercase())
        }
        Goal::Retention(t) if !t.is_finite() => Err(format!("target {t} is not finite")),
        Goal::BitsPerWeight(b) if !(b > 0.0 && b <= 32.0) => {
            Err(format!("bits_per_weight must be in (0, 32], got {b}"))
        }
        _ => Ok(()),
    }
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
    /// Per-site schemes chosen by measurement, when the recipe asks for them.
    pub allocate: Option<Allocate>,
    /// The retention the built model must keep (see [`Floors`]).
    pub floors: Option<Floors>,
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
    ("auto-99", include_str!("../../passes/auto-99.yaml")),
    ("auto-4bpw", include_str!("../../passes/auto-4bpw.yaml")),
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
        gptq: spec.gptq.unwrap_or(inherit(|b| b.gptq, false)),
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
             subspaces, importance, iterations, seed, outliers, gptq)"
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
    let s = WeightScheme {
        gptq: spec
            .gptq
            .unwrap_or(base.is_some_and(|b| b.gptq) && outliers.is_none()),
        ..WeightScheme::vq(v)
    };
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
        Some("strict") => Saturation::Strict,
        Some("ignore") => Saturation::Ignore,
        Some(s) => {
            return Err(format!(
                "{place}: saturation '{s}' is not one of fix, strict, ignore"
            ));
        }
    };
    p.gptq = a.gptq.unwrap_or(false);
    p.fold = a.fold.unwrap_or(true);
    p.conv_integer = a.conv_integer.unwrap_or(false);
    if let Some(v) = &a.smooth {
        p.smooth = match v {
            serde_yaml::Value::String(x) if x == "auto" => Some(Strength::Auto),
            serde_yaml::Value::Bool(false) => None,
            serde_yaml::Value::Number(n) => match n.as_f64() {
                Some(alpha) if alpha > 0.0 && alpha < 1.0 => Some(Strength::Alpha(alpha)),
                _ => {
                    return Err(format!(
                        "{place}: smooth must be strictly between 0 and 1 (the strength α), got {n}"
                    ));
                }
            },
            other => {
                return Err(format!(
                    "{place}: smooth must be `auto`, `false` or a strength α in (0, 1), got {}",
                    serde_yaml::to_string(other).unwrap_or_default().trim()
                ));
            }
        };
    }
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
        let allocate = file
            .allocate
            .as_ref()
            .map(|a| allocate(a, &format!("recipe {name}: allocate")))
            .transpose()?;
        let defaults = match (&file.defaults, &allocate) {
            (Some(d), _) => scheme(d, None, &format!("recipe {name}: defaults"))?,
            // Unused: sites no rule pins are the allocator's.
            (None, Some(_)) => WeightScheme::int(8, true, Granularity::PerChannel, false),
            (None, None) => {
                return Err(format!(
                    "recipe {name}: `defaults` is required (it may be left out only with `allocate`)"
                ));
            }
        };
        let rules = file
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let place = format!("recipe {name}: rules[{i}]");
                let action = match (r.skip, &r.scheme, &r.menu) {
                    (true, None, None) => Action::Skip,
                    (false, Some(s), None) => Action::Scheme(scheme(s, Some(&defaults), &place)?),
                    (false, None, Some(m)) => {
                        let Some(a) = &allocate else {
                            return Err(format!(
                                "{place}: `menu` goes with an `allocate:` section"
                            ));
                        };
                        let mut picks = Vec::new();
                        for n in m {
                            let Some(i) = a.menu.iter().position(|e| &e.name == n) else {
                                let have: Vec<&str> =
                                    a.menu.iter().map(|e| e.name.as_str()).collect();
                                return Err(format!(
                                    "{place}: menu scheme '{n}' is not in the allocate menu ({})",
                                    have.join(", ")
                                ));
                            };
                            picks.push(i);
                        }
                        if picks.is_empty() {
                            return Err(format!("{place}: the menu is empty"));
                        }
                        Action::Menu(picks)
                    }
                    (false, None, None) => {
                        return Err(format!(
                            "{place}: give `skip: true`, a `scheme` or (with allocate) a `menu`"
                        ));
                    }
                    _ => {
                        return Err(format!(
                            "{place}: `skip`, `scheme` and `menu` are alternatives, give one"
                        ));
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
        if allocate.is_some() && activations.is_some() {
            return Err(format!(
                "recipe {name}: `allocate` chooses weight schemes only; it cannot be combined with \
                 `activations` yet"
            ));
        }
        if let Some(f) = &file.floors {
            let unit = |v: Option<f64>, what: &str| match v {
                Some(x) if !(x > 0.0 && x <= 1.0) => Err(format!(
                    "recipe {name}: floors: {what} {x} is not in (0, 1]"
                )),
                _ => Ok(()),
            };
            unit(f.cosine, "cosine")?;
            unit(f.similarity, "similarity")?;
            unit(f.sequence, "sequence")?;
            unit(f.top1, "top1")?;
            if f.sqnr_db.is_some_and(|d| !d.is_finite()) {
                return Err(format!(
                    "recipe {name}: floors: sqnr_db must be a number of dB"
                ));
            }
        }
        Ok(Recipe {
            name: name.to_string(),
            description: file.description,
            defaults,
            rules,
            activations,
            allocate,
            floors: file.floors,
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

impl Recipe {
    /// The recipe with this allocation goal and menu: rules keep pinning what they match, their
    /// `menu` names are looked up in the new menu (an error when none is left), and every site no
    /// rule matches becomes the allocator's.
    pub fn with_allocate(mut self, a: Allocate) -> Result<Recipe, String> {
        check_goal(a.metric, a.goal)?;
        let old = self.allocate.as_ref().map(|o| o.menu.clone());
        for r in &mut self.rules {
            if let Action::Menu(picks) = &r.action {
                let old = old
                    .as_ref()
                    .expect("menu rules come with an allocate section");
                let kept: Vec<usize> = picks
                    .iter()
                    .filter_map(|&i| a.menu.iter().position(|e| e.name == old[i].name))
                    .collect();
                if kept.is_empty() {
                    return Err(format!(
                        "recipe {}: rules[{}]: none of its menu schemes is in the menu given",
                        self.name, r.index
                    ));
                }
                r.action = Action::Menu(kept);
            }
        }
        self.allocate = Some(a);
        Ok(self)
    }

    /// What the rules fix of a site, or the menu positions an allocator may choose from (the
    /// `allocate` menu where no rule matches). Without `allocate`, every site is fixed.
    pub fn pin(&self, site: &SiteInfo) -> Pin {
        for r in &self.rules {
            if Recipe::matches(r, site) {
                return match &r.action {
                    Action::Scheme(s) => Pin::Fixed(Decision::Quantize(*s)),
                    Action::Skip => Pin::Fixed(Decision::Skip(format!(
                        "recipe {} rules[{}]: skip",
                        self.name, r.index
                    ))),
                    Action::Menu(m) => Pin::Choose(m.clone()),
                };
            }
        }
        match &self.allocate {
            Some(a) => Pin::Choose((0..a.menu.len()).collect()),
            None => Pin::Fixed(Decision::Quantize(self.defaults)),
        }
    }
}

impl WeightPolicy for Recipe {
    /// A site the allocator would choose for takes the recipe's defaults here: allocation goes
    /// through [`crate::adapt`].
    fn decide(&self, site: &SiteInfo) -> Decision {
        match self.pin(site) {
            Pin::Fixed(d) => d,
            Pin::Choose(_) => Decision::Quantize(self.defaults),
        }
    }
}

/// A scheme as a recipe scheme map that parses back to the same scheme (every key written).
pub fn scheme_yaml(s: &WeightScheme) -> String {
    let outliers = |o: Option<OutlierRule>| match o {
        Some(OutlierRule::TopFraction(f)) => format!(", outliers: {{ fraction: {f} }}"),
        Some(OutlierRule::StdThreshold(t)) => format!(", outliers: {{ threshold: {t} }}"),
        None => String::new(),
    };
    if let Some(v) = s.vq_scheme() {
        let importance = match v.importance {
            Importance::Calibration => "calibration",
            Importance::None => "none",
        };
        return format!(
            "{{ format: vq, dim: {}, codebook_size: {}, stages: {}, subspaces: {}, importance: {importance}, iterations: {}, seed: {}{}{} }}",
            v.dim,
            v.codebook_size,
            v.stages,
            v.subspaces,
            v.iterations,
            v.seed,
            if s.gptq { ", gptq: true" } else { "" },
            outliers(v.outliers)
        );
    }
    let format = match s.format {
        Format::Int => "int",
        Format::Nf4 => "nf4",
        Format::Fp4 => "fp4",
        Format::Vq => unreachable!("handled above"),
    };
    let granularity = match s.granularity {
        Granularity::PerTensor => "granularity: tensor".to_string(),
        Granularity::PerChannel => "granularity: channel".to_string(),
        Granularity::Block(b) => format!("granularity: block, block: {b}"),
    };
    let dead_zone = match s.dead_zone {
        Some(DeadZone::Width(w)) => format!(", dead_zone: {{ width: {w} }}"),
        Some(DeadZone::Sparsity(f)) => format!(", dead_zone: {{ sparsity: {f} }}"),
        None => String::new(),
    };
    format!(
        "{{ format: {format}, bits: {}, {granularity}, symmetric: {}, clip_search: {}, double_quant: {}{}{dead_zone}{} }}",
        s.bits,
        s.symmetric,
        s.clip_search,
        s.double_quant,
        if s.gptq { ", gptq: true" } else { "" },
        outliers(s.outliers)
    )
}

/// A weight-name pattern that matches exactly `name`.
pub fn exact_pattern(name: &str) -> String {
    if name.contains(['*', '?']) || name.starts_with("re:") {
        format!("re:^{}$", regex::escape(name))
    } else {
        name.to_string()
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
    fn written_schemes_parse_back_with_their_feedback() {
        // The recipe an allocation writes must rebuild what it built: GPTQ and VQ feedback included.
        let parsed = |s: &WeightScheme| {
            Recipe::parse("t", &format!("defaults: {}\n", scheme_yaml(s)))
                .unwrap()
                .defaults
        };
        let fed = |name: &str| WeightScheme {
            gptq: true,
            ..menu_entry(name).unwrap().scheme.unwrap()
        };
        let (vq, int4) = (fed("vq2"), fed("int4"));
        for s in [vq, int4, menu_entry("vq2").unwrap().scheme.unwrap()] {
            assert_eq!(parsed(&s), s, "{}", scheme_yaml(&s));
        }
        assert!(vq.gptq && scheme_yaml(&vq).contains("gptq: true"));
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
    fn fold_is_on_unless_turned_off() {
        let fold = |text: &str| Recipe::parse("t", text).map(|r| r.activations.unwrap().fold);
        assert!(fold("defaults: { bits: 8 }\nactivations: { mode: static }\n").unwrap());
        assert!(!fold("defaults: { bits: 8 }\nactivations: { fold: false }\n").unwrap());
        let e = fold("defaults: { bits: 8 }\nactivations: { fold: sometimes }\n").unwrap_err();
        assert!(e.contains("fold"), "{e}");
        let conv =
            |text: &str| Recipe::parse("t", text).map(|r| r.activations.unwrap().conv_integer);
        assert!(!conv("defaults: { bits: 8 }\nactivations: { mode: dynamic }\n").unwrap());
        assert!(
            conv("defaults: { bits: 8 }\nactivations: { mode: dynamic, conv_integer: true }\n")
                .unwrap()
        );
    }

    #[test]
    fn smooth_takes_auto_false_or_a_strength() {
        let act = |v: &str| {
            Recipe::parse(
                "t",
                &format!("defaults: {{ bits: 8 }}\nactivations: {{ smooth: {v} }}\n"),
            )
            .map(|r| r.activations.unwrap().smooth)
        };
        assert_eq!(act("auto").unwrap(), Some(Strength::Auto));
        assert_eq!(act("0.5").unwrap(), Some(Strength::Alpha(0.5)));
        assert_eq!(act("false").unwrap(), None);
        for bad in ["1.5", "0", "sometimes", "true"] {
            let e = act(bad).unwrap_err();
            assert!(e.contains("smooth"), "{bad}: {e}");
        }
        // Dynamic mode smooths too (when given calibration data).
        assert_eq!(
            Recipe::parse(
                "t",
                "defaults: { bits: 8 }\nactivations: { mode: dynamic, smooth: auto }\n",
            )
            .unwrap()
            .activations
            .unwrap()
            .smooth,
            Some(Strength::Auto)
        );
        assert_eq!(
            Recipe::load("w8a8").unwrap().activations.unwrap().smooth,
            Some(Strength::Auto)
        );
        // Error feedback for the integer sites' weights is asked for, off by default.
        let gptq = |text: &str| {
            Recipe::parse("t", text)
                .map(|r| r.activations.unwrap().gptq)
                .unwrap()
        };
        assert!(gptq(
            "defaults: { bits: 8 }\nactivations: { mode: dynamic, gptq: true }\n"
        ));
        assert!(!gptq(
            "defaults: { bits: 8 }\nactivations: { mode: dynamic }\n"
        ));
        // Scalar schemes and VQ take it; VQ with kept outliers does not.
        let r = Recipe::parse("t", "defaults: { bits: 4, block: 32, gptq: true }\n").unwrap();
        assert!(r.defaults.gptq);
        let r = Recipe::parse("t", "defaults: { format: vq, gptq: true }\n").unwrap();
        assert!(r.defaults.gptq && r.defaults.label().ends_with("gptq"));
        let e = Recipe::parse(
            "t",
            "defaults: { format: vq, gptq: true, outliers: { fraction: 0.01 } }\n",
        )
        .unwrap_err();
        assert!(e.contains("gptq"), "{e}");
    }

    #[test]
    fn floors_read_every_figure_and_refuse_what_cannot_be() {
        let r = Recipe::parse(
            "t",
            "defaults: { bits: 8 }\nfloors: { cosine: 0.99, sqnr_db: 20, top1: 0.98, similarity: 0.985, sequence: 0.9 }\n",
        )
        .unwrap();
        let f = r.floors.unwrap();
        assert_eq!(
            (f.similarity, f.sequence, f.top1),
            (Some(0.985), Some(0.9), Some(0.98))
        );
        for (bad, word) in [
            ("similarity: 1.5", "similarity 1.5"),
            ("sequence: 0", "sequence 0"),
            ("recall: 0.9", "recall"),
        ] {
            let e = Recipe::parse(
                "t",
                &format!("defaults: {{ bits: 8 }}\nfloors: {{ {bad} }}\n"),
            )
            .unwrap_err();
            assert!(e.contains(word), "{e}");
        }
        assert_eq!("similarity".parse::<Metric>(), Ok(Metric::Similarity));
        assert!("recall".parse::<Metric>().unwrap_err().contains("sequence"));
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
