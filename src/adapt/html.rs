//! The quantization report as one self-contained HTML page: inline SVG charts and tables, no
//! script and nothing fetched. It is drawn from the JSON report `quench quantize --report` writes,
//! so the page and the JSON always show the same numbers.
//!
//! - retention against size for every allocation measured (uniform schemes, points on the path,
//!   the final model) — the Pareto front;
//! - bits per weight of each weight site, in model order, coloured by scheme;
//! - each site's weight SQNR, and the output SQNR with only that site quantized;
//! - the weight bytes by scheme.

use std::fmt::Write;

use serde_json::Value;

const W: f64 = 860.0;
const H: f64 = 300.0;
const PAD_L: f64 = 60.0;
const PAD_R: f64 = 20.0;
const PAD_T: f64 = 20.0;
const PAD_B: f64 = 50.0;
const PALETTE: &[&str] = &[
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// A per-site figure read from the report.
type Figure<'a> = dyn Fn(&Value) -> Option<f64> + 'a;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn num(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) if s == "inf" => Some(f64::INFINITY),
        Value::String(s) if s == "-inf" => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

fn db_of_nsr(nsr: f64) -> f64 {
    super::nsr_db(nsr)
}

/// A linear axis mapping [lo, hi] onto [a, b] with about five round ticks.
struct Axis {
    lo: f64,
    hi: f64,
    a: f64,
    b: f64,
}

impl Axis {
    fn new(lo: f64, hi: f64, a: f64, b: f64) -> Axis {
        let (lo, hi) = if (hi - lo).abs() < 1e-12 {
            (lo - 1.0, hi + 1.0)
        } else {
            (lo, hi)
        };
        Axis { lo, hi, a, b }
    }

    fn at(&self, v: f64) -> f64 {
        self.a + (v.clamp(self.lo, self.hi) - self.lo) / (self.hi - self.lo) * (self.b - self.a)
    }

    fn ticks(&self) -> Vec<f64> {
        let span = self.hi - self.lo;
        let raw = span / 5.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| span / s <= 6.0)
            .unwrap_or(10.0 * mag);
        let mut t = (self.lo / step).ceil() * step;
        let mut out = Vec::new();
        while t <= self.hi + 1e-9 {
            out.push(t);
            t += step;
        }
        out
    }
}

/// Frame, grid and labels of a chart; returns the two axes.
fn frame(out: &mut String, x: (f64, f64), y: (f64, f64), xl: &str, yl: &str) -> (Axis, Axis) {
    let ax = Axis::new(x.0, x.1, PAD_L, W - PAD_R);
    let ay = Axis::new(y.0, y.1, H - PAD_B, PAD_T);
    let _ = write!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">"##
    );
    for t in ay.ticks() {
        let yy = ay.at(t);
        let _ = write!(
            out,
            r##"<line x1="{PAD_L}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - PAD_R,
            PAD_L - 4.0,
            yy + 4.0,
            fmt_tick(t)
        );
    }
    for t in ax.ticks() {
        let xx = ax.at(t);
        let _ = write!(
            out,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{PAD_T}" y2="{}" stroke="#eee"/><text x="{xx:.1}" y="{}" text-anchor="middle">{}</text>"##,
            H - PAD_B,
            H - PAD_B + 14.0,
            fmt_tick(t)
        );
    }
    let _ = write!(
        out,
        r##"<rect x="{PAD_L}" y="{PAD_T}" width="{}" height="{}" fill="none" stroke="#888"/><text x="{}" y="{}" text-anchor="middle">{}</text><text transform="translate(14,{}) rotate(-90)" text-anchor="middle">{}</text>"##,
        W - PAD_L - PAD_R,
        H - PAD_T - PAD_B,
        (PAD_L + W - PAD_R) / 2.0,
        H - 12.0,
        esc(xl),
        (PAD_T + H - PAD_B) / 2.0,
        esc(yl)
    );
    (ax, ay)
}

fn fmt_tick(v: f64) -> String {
    if v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Output SQNR against bits per weight for every measured allocation.
fn pareto(out: &mut String, tried: &[Value]) {
    let pts: Vec<(String, f64, f64)> = tried
        .iter()
        .filter_map(|p| {
            let kind = p["kind"].as_str()?.to_string();
            let bpw = num(&p["bits_per_weight"])?;
            let nsr = num(&p["measured"]["nsr"])?;
            Some((kind, bpw, db_of_nsr(nsr)))
        })
        .collect();
    if pts.is_empty() {
        return;
    }
    let finite: Vec<f64> = pts.iter().map(|p| p.2).filter(|v| v.is_finite()).collect();
    let ymax = finite.iter().copied().fold(0.0, f64::max) + 3.0;
    let ymin = finite.iter().copied().fold(ymax, f64::min).min(0.0);
    let xmax = pts.iter().map(|p| p.1).fold(1.0, f64::max).min(34.0);
    out.push_str("<h2>Retention against size</h2><p>Every allocation measured on the evaluation data: the uniform schemes (squares), points on the allocation path (circles) and the model written (star). Float is drawn at the top edge.</p>");
    let (ax, ay) = frame(
        out,
        (0.0, xmax),
        (ymin, ymax),
        "bits per weight",
        "output SQNR (dB)",
    );
    let mut path: Vec<&(String, f64, f64)> = pts
        .iter()
        .filter(|p| p.0.starts_with("path") || p.0 == "final" || p.0 == "repair")
        .collect();
    path.sort_by(|a, b| a.1.total_cmp(&b.1));
    let line: Vec<String> = path
        .iter()
        .map(|p| format!("{:.1},{:.1}", ax.at(p.1), ay.at(p.2)))
        .collect();
    let _ = write!(
        out,
        r##"<polyline points="{}" fill="none" stroke="#4e79a7" stroke-dasharray="4 3"/>"##,
        line.join(" ")
    );
    for (kind, bpw, db) in &pts {
        let (x, y) = (ax.at(*bpw), ay.at(*db));
        let title = format!("{kind}: {bpw:.2} bits/weight, {db:.2} dB");
        if let Some(name) = kind.strip_prefix("uniform ") {
            let _ = write!(
                out,
                r##"<rect x="{:.1}" y="{:.1}" width="8" height="8" fill="#f28e2b"><title>{}</title></rect><text x="{:.1}" y="{:.1}" fill="#a0522d">{}</text>"##,
                x - 4.0,
                y - 4.0,
                esc(&title),
                x + 6.0,
                y - 6.0,
                esc(name)
            );
        } else if kind == "final" {
            let _ = write!(
                out,
                r##"<polygon points="{}" fill="#e15759"><title>{}</title></polygon>"##,
                star(x, y),
                esc(&title)
            );
        } else {
            let _ = write!(
                out,
                r##"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="#4e79a7"><title>{}</title></circle>"##,
                esc(&title)
            );
        }
    }
    out.push_str("</svg>");
}

fn star(x: f64, y: f64) -> String {
    (0..10)
        .map(|i| {
            let r = if i % 2 == 0 { 8.0 } else { 3.5 };
            let a = std::f64::consts::PI * (i as f64) / 5.0 - std::f64::consts::FRAC_PI_2;
            format!("{:.1},{:.1}", x + r * a.cos(), y + r * a.sin())
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One bar per site (model order); `value` gives the bar height and its legend key.
fn bars(
    out: &mut String,
    sites: &[Value],
    ylabel: &str,
    value: impl Fn(&Value) -> Option<f64>,
    dots: Option<&Figure<'_>>,
    legend: &[String],
) {
    let vals: Vec<Option<f64>> = sites.iter().map(&value).collect();
    let dot_vals: Vec<Option<f64>> = sites.iter().map(|s| dots.and_then(|d| d(s))).collect();
    let all: Vec<f64> = vals
        .iter()
        .chain(&dot_vals)
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    let ymax = all.iter().copied().fold(1.0, f64::max) * 1.1;
    let (ax, ay) = frame(
        out,
        (0.0, sites.len().max(1) as f64),
        (0.0, ymax),
        "weight sites in model order",
        ylabel,
    );
    let bw = (ax.at(1.0) - ax.at(0.0)) * 0.8;
    for (i, (s, v)) in sites.iter().zip(&vals).enumerate() {
        let Some(v) = v else { continue };
        let key = s["scheme_key"].as_str().unwrap_or("");
        let color = legend
            .iter()
            .position(|l| l == key)
            .map_or("#888", |k| PALETTE[k % PALETTE.len()]);
        let v = if v.is_finite() { *v } else { ymax };
        let (x, y0, y1) = (ax.at(i as f64) + bw * 0.125, ay.at(0.0), ay.at(v));
        let _ = write!(
            out,
            r##"<rect x="{x:.1}" y="{y1:.1}" width="{bw:.1}" height="{:.1}" fill="{color}"><title>{}: {} {v:.2}</title></rect>"##,
            (y0 - y1).max(0.0),
            esc(s["weight"].as_str().unwrap_or("")),
            esc(key)
        );
    }
    for (i, d) in dot_vals.iter().enumerate() {
        if let Some(d) = d.filter(|d| d.is_finite()) {
            let _ = write!(
                out,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="#000"><title>output SQNR with only this site quantized: {d:.2} dB</title></circle>"##,
                ax.at(i as f64 + 0.5),
                ay.at(d)
            );
        }
    }
    out.push_str("</svg>");
    out.push_str("<p class=\"legend\">");
    for (k, l) in legend.iter().enumerate() {
        let _ = write!(
            out,
            r#"<span><i style="background:{}"></i>{}</span> "#,
            PALETTE[k % PALETTE.len()],
            esc(l)
        );
    }
    out.push_str("</p>");
}

fn goal_text(alloc: &Value) -> String {
    let metric = alloc["metric"].as_str().unwrap_or("cosine");
    let g = &alloc["goal"];
    match (num(&g["retention"]), num(&g["bits_per_weight"])) {
        (Some(t), _) => format!("{metric} ≥ {t}"),
        (_, Some(b)) => format!("best {metric} within {b} bits per weight"),
        _ => g.to_string(),
    }
}

/// The page for a `quench quantize` JSON report.
pub fn page(report: &Value, title: &str) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{}</title><style>
body{{font-family:sans-serif;max-width:900px;margin:20px auto;color:#222}}
table{{border-collapse:collapse;font-size:12px;margin:8px 0}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}.legend span{{margin-right:12px;font-size:12px}}
.legend i{{display:inline-block;width:10px;height:10px;margin-right:4px}}.met{{color:#2a7}}.missed{{color:#c33}}
</style></head><body><h1>{}</h1>"#,
        esc(title),
        esc(title)
    );
    let w = &report["weights"];
    let before = num(&report["file_bytes"]["before"]).unwrap_or(0.0);
    let after = num(&report["file_bytes"]["after"]).unwrap_or(0.0);
    let _ = write!(
        out,
        "<p>Recipe <b>{}</b>, target {}. File {:.2} MB → {:.2} MB ({:.3}×); {:.2} bits per quantized weight.</p>",
        esc(report["recipe"].as_str().unwrap_or("")),
        esc(&report["target"].to_string()),
        before / 1e6,
        after / 1e6,
        if before > 0.0 { after / before } else { 0.0 },
        num(&w["bits_per_weight"]).unwrap_or(0.0)
    );
    let alloc = &report["allocation"];
    if alloc.is_object() {
        let met = alloc["met"].as_bool().unwrap_or(false);
        let _ = write!(
            out,
            r#"<p>Allocation goal {}: <b class="{}">{}</b>. Measured on {} ({} batches): cosine {:.5}, SQNR {:.2} dB{}, at {:.2} bits per weight over all weight sites, after {} repairs. Sensitivity: {} candidates measured, {} from the cache, {} pruned by the proxy; Spearman (proxy vs measured) {}.</p>"#,
            esc(&goal_text(alloc)),
            if met { "met" } else { "missed" },
            if met { "met" } else { "not met" },
            esc(alloc["measured_on"].as_str().unwrap_or("")),
            alloc["evaluation_batches"],
            num(&alloc["measured"]["cosine"]).unwrap_or(f64::NAN),
            db_of_nsr(num(&alloc["measured"]["nsr"]).unwrap_or(f64::NAN)),
            num(&alloc["measured"]["top1"])
                .map(|t| format!(", top-1 {:.2}%", 100.0 * t))
                .unwrap_or_default(),
            num(&alloc["bits_per_weight"]).unwrap_or(f64::NAN),
            alloc["repairs"],
            alloc["sensitivity"]["measured"],
            alloc["sensitivity"]["cached"],
            alloc["sensitivity"]["pruned"],
            num(&alloc["sensitivity"]["spearman"]).map_or("n/a".into(), |r| format!("{r:.3}"))
        );
        if let Some(tried) = alloc["tried"].as_array() {
            pareto(&mut out, tried);
            out.push_str("<table><tr><th>allocation</th><th>bits/weight</th><th>MB</th><th>predicted SQNR dB</th><th>measured SQNR dB</th><th>cosine</th><th>top-1</th></tr>");
            for p in tried {
                let m = &p["measured"];
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{:.3}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.5}</td><td>{}</td></tr>",
                    esc(p["kind"].as_str().unwrap_or("")),
                    num(&p["bits_per_weight"]).unwrap_or(f64::NAN),
                    num(&p["bytes"]).unwrap_or(f64::NAN) / 1e6,
                    num(&p["predicted_nsr"]).map_or(f64::NAN, db_of_nsr),
                    num(&m["nsr"]).map_or(f64::NAN, db_of_nsr),
                    num(&m["cosine"]).unwrap_or(f64::NAN),
                    num(&m["top1"]).map_or("-".into(), |t| format!("{:.2}%", 100.0 * t))
                );
            }
            out.push_str("</table>");
        }
    }
    // Sites of the weight report, with the allocation's measured sensitivity where there is one.
    let alone: std::collections::HashMap<&str, f64> = alloc["sites"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| Some((s["weight"].as_str()?, num(&s["output_sqnr_db_alone"])?)))
                .collect()
        })
        .unwrap_or_default();
    let sites: Vec<Value> = w["sites"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    let mut s = s.clone();
                    let key = s["label"].as_str().unwrap_or("float").to_string();
                    s["scheme_key"] = Value::String(key);
                    s
                })
                .collect()
        })
        .unwrap_or_default();
    let mut legend: Vec<String> = Vec::new();
    for s in &sites {
        let k = s["scheme_key"].as_str().unwrap_or("float").to_string();
        if !legend.contains(&k) {
            legend.push(k);
        }
    }
    let params = |s: &Value| -> Option<f64> {
        let shape = s["shape"].as_array()?;
        Some(shape.iter().filter_map(|d| d.as_f64()).product::<f64>())
    };
    if !sites.is_empty() {
        out.push_str("<h2>Bits per weight along the network</h2>");
        bars(
            &mut out,
            &sites,
            "bits per weight",
            |s| Some(num(&s["bytes_after"])? * 8.0 / params(s)?.max(1.0)),
            None,
            &legend,
        );
        out.push_str("<h2>Per-layer SQNR</h2><p>Bars: the weight's own SQNR (float drawn full height). Dots: the model's output SQNR with only that site quantized, from sensitivity.</p>");
        let dots = |s: &Value| alone.get(s["weight"].as_str()?).copied();
        bars(
            &mut out,
            &sites,
            "dB",
            |s| num(&s["weight_sqnr_db"]),
            Some(&dots),
            &legend,
        );
        // Bytes by scheme.
        let mut by: Vec<(String, f64, f64)> = Vec::new();
        for s in &sites {
            let k = s["scheme_key"].as_str().unwrap_or("float").to_string();
            let b = num(&s["bytes_after"]).unwrap_or(0.0);
            let p = params(s).unwrap_or(0.0);
            match by.iter_mut().find(|e| e.0 == k) {
                Some(e) => {
                    e.1 += b;
                    e.2 += p;
                }
                None => by.push((k, b, p)),
            }
        }
        let total: f64 = by.iter().map(|e| e.1).sum::<f64>().max(1.0);
        out.push_str("<h2>Size by scheme</h2>");
        let _ = write!(
            out,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="40" viewBox="0 0 {W} 40">"##
        );
        let mut x = 0.0;
        for (k, b, _) in &by {
            let wdt = b / total * W;
            let color = legend
                .iter()
                .position(|l| l == k)
                .map_or("#888", |i| PALETTE[i % PALETTE.len()]);
            let _ = write!(
                out,
                r##"<rect x="{x:.1}" y="5" width="{wdt:.1}" height="30" fill="{color}"><title>{}: {:.2} MB</title></rect>"##,
                esc(k),
                b / 1e6
            );
            x += wdt;
        }
        out.push_str("</svg><table><tr><th>scheme</th><th>sites</th><th>parameters</th><th>MB</th><th>share</th><th>bits/weight</th></tr>");
        for (k, b, p) in &by {
            let n = sites
                .iter()
                .filter(|s| s["scheme_key"].as_str() == Some(k))
                .count();
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{n}</td><td>{p:.0}</td><td>{:.3}</td><td>{:.1}%</td><td>{:.2}</td></tr>",
                esc(k),
                b / 1e6,
                100.0 * b / total,
                b * 8.0 / p.max(1.0)
            );
        }
        out.push_str("</table><h2>Sites</h2><table><tr><th>weight</th><th>role</th><th>shape</th><th>scheme</th><th>form</th><th>KB</th><th>weight SQNR dB</th><th>output SQNR alone dB</th></tr>");
        for s in &sites {
            let name = s["weight"].as_str().unwrap_or("");
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{}</td></tr>",
                esc(name),
                esc(s["role"].as_str().unwrap_or("")),
                esc(&s["shape"].to_string()),
                esc(s["scheme_key"].as_str().unwrap_or("")),
                esc(s["form"].as_str().unwrap_or("-")),
                num(&s["bytes_after"]).unwrap_or(0.0) / 1e3,
                num(&s["weight_sqnr_db"]).map_or("-".into(), |v| format!("{v:.2}")),
                alone.get(name).map_or("-".into(), |v| format!("{v:.2}"))
            );
        }
        out.push_str("</table>");
    }
    out.push_str("</body></html>\n");
    out
}
