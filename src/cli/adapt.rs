//! `quench sensitivity` and the allocation path of `quench quantize` (--target-retention,
//! --bits-per-weight, recipes with `allocate:`): flags become library options here; the work is
//! done by `quench::adapt`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;

use quench::Model;
use quench::adapt::{self, Allocation, Probe, Sensitivity, SensitivityOptions, Workspace};
use quench::exec::{Named, RuntimeKind, SessionOptions};
use quench::recipes::{Allocate, DEFAULT_MENU, Goal, Metric, Recipe, parse_menu};
use quench::zoo::InputSpec;

use super::{CalibArgs, InputArgs, QuantizeArgs, RuntimeArgs, calib_input_args, calib_runtime};

/// What an allocation must reach.
#[derive(Args, Clone, Debug)]
pub struct GoalArgs {
    /// Allocate a scheme per weight site: the smallest model whose retention, measured on the
    /// evaluation data, reaches X (with --metric; cosine by default).
    #[arg(long, value_name = "X", conflicts_with = "bits_per_weight")]
    target_retention: Option<f64>,
    /// Allocate a scheme per weight site: the best measured retention within B bits per weight
    /// (over all weight sites; float counts 32).
    #[arg(long, value_name = "B")]
    bits_per_weight: Option<f64>,
    /// The retention figure: cosine, sqnr (dB), top1, similarity (ranking of embedding rows) or
    /// sequence (sequences decoded alike); the lowest over the outputs.
    #[arg(long)]
    metric: Option<Metric>,
    /// Data the allocation is measured on (default: the calibration data, said in a note).
    #[arg(long, value_name = "DATA")]
    eval: Option<PathBuf>,
    /// Measure the allocation on N generated batches (seed: --seed + 2).
    #[arg(long, value_name = "N", conflicts_with = "eval")]
    eval_random: Option<usize>,
    /// Also write the allocation as a recipe (one rule per site); default `<output>.recipe.yaml`.
    #[arg(long, value_name = "FILE")]
    write_recipe: Option<PathBuf>,
}

impl GoalArgs {
    pub fn requested(&self) -> bool {
        self.target_retention.is_some() || self.bits_per_weight.is_some()
    }

    /// The recipe with the goal, metric and menu of the flags over its own `allocate:`.
    pub fn apply(&self, recipe: Recipe, sens: &SensArgs) -> Result<Recipe> {
        let base = recipe.allocate.clone();
        let metric = self
            .metric
            .or(base.as_ref().map(|a| a.metric))
            .unwrap_or(Metric::Cosine);
        let goal = match (self.target_retention, self.bits_per_weight, &base) {
            (Some(t), None, _) => Goal::Retention(t),
            (None, Some(b), _) => Goal::BitsPerWeight(b),
            (None, None, Some(a)) => a.goal,
            _ => bail!("give --target-retention or --bits-per-weight"),
        };
        let menu = match (&sens.schemes, &base) {
            (Some(list), _) => {
                parse_menu(&split_list(list)).map_err(|e| anyhow!("--schemes: {e}"))?
            }
            (None, Some(a)) => a.menu.clone(),
            (None, None) => parse_menu(
                &DEFAULT_MENU
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
            )
            .map_err(|e| anyhow!(e))?,
        };
        recipe
            .with_allocate(Allocate { metric, goal, menu })
            .map_err(|e| anyhow!(e))
    }
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

/// How sensitivity is measured.
#[derive(Args, Clone, Debug)]
pub struct SensArgs {
    /// The menu of schemes, comma-separated (float, int8, int4, nf4, int3, int2, vq3, vq2, vq1;
    /// default: the recipe's, else float,int8,int4,nf4,vq3,vq2).
    #[arg(long, value_name = "LIST")]
    schemes: Option<String>,
    /// Calibration batches each sensitivity candidate runs on.
    #[arg(long, value_name = "N", default_value_t = 8)]
    sensitivity_batches: usize,
    /// Where sensitivity results are cached (default: $QUENCH_CACHE, else
    /// $XDG_CACHE_HOME/quench, else ~/.cache/quench).
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Measure everything again and keep no cache.
    #[arg(long)]
    no_cache: bool,
    /// Measure every option, also those the proxy says are dominated.
    #[arg(long)]
    no_prune: bool,
}

#[derive(Args, Debug)]
pub struct SensitivityArgs {
    /// The model (an ONNX file or zoo:NAME).
    model: String,
    /// Rules that pin sites (skip, a scheme, or a menu); default auto-99's.
    #[arg(long)]
    recipe: Option<String>,
    #[command(flatten)]
    input: InputArgs,
    #[command(flatten)]
    cal: CalibArgs,
    #[command(flatten)]
    sens: SensArgs,
    #[command(flatten)]
    rt: RuntimeArgs,
    /// Write the table as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Everything a sensitivity run needs from the flags.
struct SensSetup<'a> {
    path: &'a Path,
    input: &'a InputArgs,
    cal: &'a CalibArgs,
    sens: &'a SensArgs,
    rt: &'a RuntimeArgs,
}

/// The probe session: exact numerics, every core unless --threads says otherwise.
fn probe_session(rt: &RuntimeArgs) -> SessionOptions {
    SessionOptions {
        threads: rt.threads,
        numerics: quench::exec::Numerics::Exact,
        ..Default::default()
    }
}

fn read_batches(set: &mut quench::exec::inputs::InputSet, n: usize) -> Result<Vec<Vec<Named>>> {
    (0..set.len().min(n))
        .map(|b| set.batch(b).with_context(|| format!("batch {b}")))
        .collect()
}

fn run_sensitivity<'m>(
    s: &SensSetup,
    model: &'m Model,
    spec: Vec<InputSpec>,
    recipe: &Recipe,
) -> Result<(Sensitivity, Workspace<'m>, Probe)> {
    let ca = calib_input_args(s.input, s.cal);
    if ca.inputs.is_none() && ca.random.is_none() {
        bail!(
            "sensitivity runs the model: give calibration data with --calib DATA (or --calib-random N)"
        );
    }
    let alloc = recipe
        .allocate
        .as_ref()
        .ok_or_else(|| anyhow!("recipe {} has no allocate menu", recipe.name))?;
    let (runtime, lean) = calib_runtime(s.cal, s.rt);
    super::first_batch_checked(&ca, model, spec.clone()).context("the calibration data")?;
    let mut set = ca.open(model, spec.clone())?;
    let wanted = adapt::energy_requests(model);
    let energy = if wanted.is_empty() {
        None
    } else {
        Some(quench::calib::energy_of(
            quench::calib::channel_stats(model, &wanted, &mut set, runtime, &lean)
                .context("measuring the input-channel energy failed")?,
        ))
    };
    // Error feedback's input Hessians, fitted where a replay of the written recipe fits them
    // (`calib::gptq_split`), so that every option is measured as the built model will have it.
    let requests = adapt::feedback_requests(model, recipe, &alloc.menu);
    let hessians = if requests.is_empty() {
        adapt::Hessians::new()
    } else {
        let (fit, _) = quench::calib::gptq_split(set.len());
        let mut fit_set = ca
            .open(model, spec)?
            .subset(fit, "the batches GPTQ fits on");
        quench::calib::hessians(model, &requests, &mut fit_set, runtime, &lean)
            .context("measuring the input Hessians for error feedback failed")?
    };
    let batches = read_batches(&mut set, s.sens.sensitivity_batches.max(1))?;
    let model_key =
        std::fs::read(s.path).with_context(|| format!("cannot read {}", s.path.display()))?;
    let opts = SensitivityOptions {
        recipe,
        menu: &alloc.menu,
        runtime,
        session: probe_session(s.rt),
        cache_dir: if s.sens.no_cache {
            None
        } else {
            s.sens.cache.clone().or_else(adapt::default_cache_dir)
        },
        no_prune: s.sens.no_prune,
        model_key,
        data: set.description.clone(),
    };
    adapt::sensitivity(model, &opts, energy, hessians, batches)
}

fn pins_recipe(name: Option<&str>, sens: &SensArgs) -> Result<Recipe> {
    let recipe = Recipe::load(name.unwrap_or("auto-99")).map_err(|e| anyhow!(e))?;
    let goal = GoalArgs {
        target_retention: None,
        bits_per_weight: None,
        metric: None,
        eval: None,
        eval_random: None,
        write_recipe: None,
    };
    if recipe.allocate.is_some() {
        goal.apply(recipe, sens)
    } else {
        // A recipe without an allocate section: its rules pin, the rest takes the menu.
        let g = GoalArgs {
            target_retention: Some(0.99),
            ..goal
        };
        g.apply(recipe, sens)
    }
}

/// One line per site: each menu scheme's output SQNR with only that site changed.
fn render_sensitivity(s: &Sensitivity) -> String {
    use std::fmt::Write;
    let short = quench::report::compare::truncate;
    let mut out = format!("{:<44} {:<9} {:>9}", "weight", "role", "params");
    for m in &s.menu {
        let _ = write!(out, " {m:>8}");
    }
    out.push('\n');
    for t in &s.sites {
        let _ = write!(
            out,
            "{:<44} {:<9} {:>9}",
            short(&t.weight, 44),
            t.role.name(),
            t.params
        );
        for m in &s.menu {
            let cell = match t.options.iter().find(|o| &o.name == m) {
                None if t.pinned => "pinned".to_string(),
                None => "".to_string(),
                Some(o) if o.name == "float" => "inf".to_string(),
                Some(o) => match (o.measured, &o.note) {
                    (Some(sc), _) => format!("{:.1}", sc.sqnr_db()),
                    (None, Some(n)) if n.starts_with("not measured") => "pruned".into(),
                    _ => "n/a".into(),
                },
            };
            let _ = write!(out, " {cell:>8}");
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "output SQNR (dB) with only that site changed, on {} batches of {} in {}; {} measured, {} \
         from the cache, {} pruned by the proxy; {:.1} s",
        s.batches, s.data, s.runtime, s.measured, s.cached, s.pruned, s.seconds
    );
    let _ = writeln!(
        out,
        "proxy (output error under the input Hessian, else energy-weighted weight error) vs \
         measured output noise: Spearman {} over all \
         candidates, {} within sites",
        s.spearman.map_or("n/a".into(), |r| format!("{r:.3}")),
        s.spearman_within_sites
            .map_or("n/a".into(), |r| format!("{r:.3}"))
    );
    out
}

pub fn sensitivity(args: SensitivityArgs) -> Result<()> {
    let (path, spec) = super::resolve_model(&args.model)?;
    if let Some(j) = &args.json {
        let mut reads = args.input.paths();
        reads.push(&path);
        super::refuse_overwrite(j, &reads)?;
    }
    let recipe = pins_recipe(args.recipe.as_deref(), &args.sens)?;
    let model = Model::load(&path)?;
    let setup = SensSetup {
        path: &path,
        input: &args.input,
        cal: &args.cal,
        sens: &args.sens,
        rt: &args.rt,
    };
    let (sens, _, _) = run_sensitivity(&setup, &model, spec, &recipe)?;
    print!("{}", render_sensitivity(&sens));
    if let Some(j) = &args.json {
        quench::util::write_atomic(j, &serde_json::to_vec_pretty(&sens)?)?;
        println!("wrote {}", j.display());
    }
    Ok(())
}

/// What the allocation path hands back to `quantize`.
pub struct Allocated {
    pub json: serde_json::Value,
}

/// Builds the allocation with the real pass (its `gptq` sites fed where `hessians` has theirs,
/// rounded to nearest without).
fn build(
    args: &QuantizeArgs,
    reference: &Model,
    policy: &adapt::Assignment,
    energy: Option<&quench::passes::quantize_weights::importance::ChannelEnergy>,
    hessians: Option<&adapt::Hessians>,
) -> Result<(Model, quench::passes::quantize_weights::WeightReport)> {
    let mut m = reference.clone();
    let w = super::quantize_weights_checked(&mut m, policy, args.target, energy, hessians)?;
    Ok((m, w))
}

/// Sensitivity, the allocation path, measurement, build, repair; returns the built model.
pub fn allocate(
    args: &QuantizeArgs,
    path: &Path,
    reference: &Model,
    spec: Vec<InputSpec>,
    recipe: &Recipe,
    notes: &mut Vec<String>,
) -> Result<(
    Model,
    quench::passes::quantize_weights::WeightReport,
    Allocated,
)> {
    if recipe.activations.is_some() {
        bail!(
            "allocation chooses weight schemes; recipe {} also quantizes activations",
            recipe.name
        );
    }
    let a = recipe.allocate.clone().expect("set by GoalArgs::apply");
    let setup = SensSetup {
        path,
        input: &args.input,
        cal: &args.cal,
        sens: &args.sens,
        rt: &args.rt,
    };
    let (sens, mut ws, calib_probe) = run_sensitivity(&setup, reference, spec.clone(), recipe)?;
    let calib_spec = spec.clone();
    println!("{}", render_sensitivity(&sens));

    // The evaluation batches: --eval / --eval-random, else the calibration batches.
    let (runtime, _) = calib_runtime(&args.cal, &args.rt);
    let mut ea = args.input.clone();
    ea.inputs = args.goal.eval.clone();
    ea.random = args.goal.eval_random;
    ea.seed = args.input.seed.wrapping_add(2);
    ea.default_random = 0;
    let mut probe = if ea.inputs.is_none() && ea.random.is_none() {
        notes.push(
            "the allocation was measured on the calibration data (give --eval DATA for data it was \
             not chosen on)"
                .into(),
        );
        calib_probe
    } else {
        drop(calib_probe);
        let mut set = ea.open(reference, spec)?;
        let batches = read_batches(&mut set, 256)?;
        Probe::new(
            reference,
            &ws.lifted(),
            batches,
            runtime,
            &probe_session(&args.rt),
        )?
    };
    let eval_batches = probe.batches();

    // Each uniform scheme, and the allocation of the same size: the Pareto comparison.
    let mut alloc = Allocation::new(&sens);
    for m in &sens.menu {
        if let Some(c) = alloc.uniform(m) {
            alloc.measure(&mut ws, &mut probe, &c, &format!("uniform {m}"))?;
            if let Ok(same) = alloc.within_budget(alloc.bits_per_weight(&c)) {
                alloc.measure(
                    &mut ws,
                    &mut probe,
                    &same,
                    &format!("path at the size of {m}"),
                )?;
            }
        }
    }
    let metric = a.metric;
    let (mut choice, reachable) = match a.goal {
        Goal::Retention(t) => match alloc.search_retention(&mut ws, &mut probe, metric, t)? {
            Ok(c) => (c, true),
            Err(best) => (best, false),
        },
        Goal::BitsPerWeight(b) => match alloc.within_budget(b) {
            Ok(c) => {
                let on_path = alloc.measure(&mut ws, &mut probe, &c, "path")?;
                // A uniform scheme within the budget that measured better is taken instead: the
                // path's noise adds up only to first order.
                let better = alloc
                    .tried
                    .iter()
                    .filter(|p| p.bits_per_weight <= b + 1e-9)
                    .filter_map(|p| Some((p.measured?.value(metric), p)))
                    .filter(|(v, _)| *v > on_path.value(metric))
                    .max_by(|x, y| x.0.total_cmp(&y.0))
                    .map(|(_, p)| p.choice.clone());
                (better.unwrap_or(c), true)
            }
            Err(smallest) => (smallest, false),
        },
    };

    // Build with the real pass and measure what will be written; repair a missed target. Sites
    // measured with error feedback are built with it.
    let energy = ws.energy().cloned();
    let energy = energy.as_ref();
    let hessians = ws.hessians();
    let fed_hessians = (!hessians.is_empty()).then_some(&*hessians);
    let measure_built = |m: &Model, probe: &Probe| -> Result<adapt::Score> {
        probe_score(m, probe, runtime, &args.rt)
    };
    let build_fed =
        |policy: &adapt::Assignment| build(args, reference, policy, energy, fed_hessians);
    let (mut model, mut report) = build_fed(&alloc.policy(&choice))?;
    let mut built = measure_built(&model, &probe)?;
    let mut repairs = 0;
    if let Goal::Retention(t) = a.goal {
        while reachable && built.value(metric) < t {
            if !alloc.raise_worst(&mut choice) {
                break;
            }
            repairs += 1;
            alloc.measure(&mut ws, &mut probe, &choice, "repair")?;
            (model, report) = build_fed(&alloc.policy(&choice))?;
            built = measure_built(&model, &probe)?;
        }
    }
    // Error feedback lowers each layer's output error on the data it was fitted on; it is kept
    // when the model is also closer to the float model than the same allocation rounded to nearest
    // on the calibration batches it was not fitted on (as a replay of the written recipe decides)
    // and on the evaluation data.
    let mut gptq = report
        .sites
        .iter()
        .any(|s| s.scheme.is_some_and(|x| x.gptq));
    if gptq {
        let (nearest, nearest_report) =
            build(args, reference, &alloc.policy(&choice), energy, None)?;
        let keep =
            if super::gptq_beats_nearest(args, reference, calib_spec, &model, &nearest, notes)? {
                let score = measure_built(&nearest, &probe)?;
                if score.value(metric) > built.value(metric) {
                    notes.push(format!(
                        "gptq dropped: on the evaluation data {} {:.5} with it, {:.5} rounded to \
                     nearest",
                        adapt::metric_name(metric),
                        built.value(metric),
                        score.value(metric)
                    ));
                    built = score;
                    false
                } else {
                    true
                }
            } else {
                built = measure_built(&nearest, &probe)?;
                false
            };
        if !keep {
            (model, report, gptq) = (nearest, nearest_report, false);
        }
    }
    alloc.record(&choice, "final", Some(built));
    let met = match a.goal {
        Goal::Retention(t) => built.value(metric) >= t,
        Goal::BitsPerWeight(b) => report_bpw(&report, &sens) <= b + 1e-9,
    };
    let goal_text = adapt::describe_goal(metric, a.goal);
    let figure = built.value(metric);
    if met {
        println!(
            "allocation: {goal_text}: met, {} {figure:.5} measured on {eval_batches} evaluation \
             batches at {:.2} bits per weight ({} repairs)",
            adapt::metric_name(metric),
            report_bpw(&report, &sens),
            repairs
        );
    } else {
        let best = alloc
            .tried
            .iter()
            .filter(|p| p.measured.is_some())
            .max_by(|x, y| {
                x.measured
                    .expect("filtered")
                    .value(metric)
                    .total_cmp(&y.measured.expect("filtered").value(metric))
            })
            .map(|p| {
                (
                    p.measured.expect("filtered").value(metric),
                    p.bits_per_weight,
                )
            });
        let msg = format!(
            "allocation: {goal_text}: NOT met. Written: {} {figure:.5} at {:.2} bits per weight; \
             best measured: {}",
            adapt::metric_name(metric),
            report_bpw(&report, &sens),
            best.map_or("none".into(), |(v, b)| format!(
                "{v:.5} at {b:.2} bits per weight"
            ))
        );
        println!("{msg}");
        notes.push(msg);
    }

    let recipe_path = args
        .goal
        .write_recipe
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.recipe.yaml", args.output.display())));
    super::refuse_overwrite(&recipe_path, &[path])?;
    let header = format!(
        "Written by quench: {} for {}, {goal_text}, measured {} {figure:.5}.\nReplay it with the same \
         calibration data (VQ sites are clustered by its input-channel energy):\n  quench quantize \
         MODEL --recipe {} --calib DATA",
        recipe.name,
        path.file_name()
            .map_or("the model".into(), |f| f.to_string_lossy().to_string()),
        adapt::metric_name(metric),
        recipe_path.display()
    );
    quench::util::write_atomic(
        &recipe_path,
        alloc.recipe_yaml(&choice, &header, gptq).as_bytes(),
    )?;
    println!("wrote {}", recipe_path.display());

    let sites: Vec<serde_json::Value> = sens
        .sites
        .iter()
        .zip(&choice)
        .map(|(t, &o)| {
            let opt = &t.options[o];
            serde_json::json!({
                "weight": t.weight,
                "role": t.role,
                "op_types": t.op_types,
                "params": t.params,
                "scheme": opt.name,
                "label": opt.label,
                "bytes": opt.bytes,
                "bits_per_weight": opt.bytes as f64 * 8.0 / t.params.max(1) as f64,
                "weight_sqnr_db": finite(opt.weight_sqnr_db),
                "output_sqnr_db_alone": opt.measured.map(|m| finite(m.sqnr_db())),
            })
        })
        .collect();
    let json = serde_json::json!({
        "goal": a.goal,
        "metric": metric,
        "met": met,
        "reachable": reachable,
        "measured": built,
        "measured_on": if args.goal.eval.is_some() || args.goal.eval_random.is_some() { "evaluation data" } else { "calibration data" },
        "evaluation_batches": eval_batches,
        "repairs": repairs,
        "gptq": gptq,
        "bits_per_weight": report_bpw(&report, &sens),
        "recipe": recipe_path,
        "sites": sites,
        "tried": alloc.tried,
        "sensitivity": sens,
    });
    Ok((model, report, Allocated { json }))
}

fn finite(v: f64) -> serde_json::Value {
    if v.is_finite() {
        serde_json::json!(v)
    } else {
        serde_json::json!(if v > 0.0 { "inf" } else { "-inf" })
    }
}

/// Bits per weight over every weight site of the sensitivity table, from the built model's report.
fn report_bpw(r: &quench::passes::quantize_weights::WeightReport, s: &Sensitivity) -> f64 {
    let params: u64 = s.sites.iter().map(|t| t.params).sum();
    r.bytes_after as f64 * 8.0 / params.max(1) as f64
}

/// The built model's score on the probe's batches against the probe's reference outputs.
fn probe_score(
    m: &Model,
    probe: &Probe,
    runtime: RuntimeKind,
    rt: &RuntimeArgs,
) -> Result<adapt::Score> {
    probe.score_model(m, runtime, &probe_session(rt))
}
