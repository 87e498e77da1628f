//! `cove image pull` and pulls on first use by `cove run`: the registry flags, a runtime for the
//! one pull, and its progress on stderr (bars on a terminal, plain lines otherwise).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Context;
use clap::Args;
use cove_image::{
    Credentials, ImageRecord, LayerState, PullEvent, PullProgress, Reference, RegistryOptions,
    Store,
};
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How to reach the registry.
#[derive(Args, Clone, Debug, Default)]
pub struct RegistryArgs {
    /// Use plain HTTP to reach the registry (registries on this machine are tried over HTTPS,
    /// then plain HTTP, without this flag).
    #[arg(long, help_heading = "Registry")]
    pub insecure: bool,
    /// Trust the CA certificates in this PEM file for the registry's TLS, besides the system's.
    #[arg(long, value_name = "FILE", help_heading = "Registry")]
    pub ca: Option<PathBuf>,
    /// Registry credentials (default: what `docker login` stored in ~/.docker/config.json).
    #[arg(
        long,
        value_name = "USER:PASSWORD",
        env = "COVE_REGISTRY_CREDS",
        hide_env_values = true,
        help_heading = "Registry"
    )]
    pub creds: Option<Credentials>,
}

impl RegistryArgs {
    fn options(&self) -> RegistryOptions {
        RegistryOptions {
            insecure: self.insecure,
            ca_file: self.ca.clone(),
            credentials: self.creds.clone(),
        }
    }
}

/// Pulls `reference` into `store`, showing progress on stderr unless `quiet`.
pub fn pull(
    store: &Store,
    reference: &Reference,
    registry: &RegistryArgs,
    quiet: bool,
) -> anyhow::Result<ImageRecord> {
    // One thread: downloads are I/O-bound, and unpacking runs on tokio's blocking threads. The
    // runtime (and every thread it started) is gone when this returns, before any sandbox.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the pull's runtime")?;
    let progress: Box<dyn PullProgress> = if quiet {
        Box::new(cove_image::NoProgress)
    } else if std::io::stderr().is_terminal() {
        Box::new(Bars::new())
    } else {
        Box::new(Lines::new(reference))
    };
    let result = runtime.block_on(cove_image::pull(
        store,
        reference,
        &registry.options(),
        progress.as_ref(),
    ));
    drop(progress);
    drop(runtime);
    result.with_context(|| format!("pull {reference}"))
}

/// Short form of a digest for progress output: its first 12 hex digits.
fn short(digest: &cove_image::Digest) -> String {
    digest.hex()[..12].to_string()
}

/// Plain lines, one per thing that happened to a layer (for logs and pipes).
struct Lines {
    reference: String,
    layers: Mutex<Vec<(cove_image::Digest, u64)>>,
}

impl Lines {
    fn new(reference: &Reference) -> Lines {
        Lines {
            reference: reference.to_string(),
            layers: Mutex::new(Vec::new()),
        }
    }
}

impl PullProgress for Lines {
    fn event(&self, event: PullEvent) {
        let mut layers = self.layers.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            PullEvent::Resolved {
                manifest,
                layers: l,
            } => {
                let total: u64 = l.iter().map(|(_, s)| s).sum();
                eprintln!(
                    "{}: manifest {manifest}, {} layers, {}",
                    self.reference,
                    l.len(),
                    HumanBytes(total)
                );
                *layers = l;
            }
            PullEvent::Layer { index, state } => {
                let Some((digest, size)) = layers.get(index) else {
                    return;
                };
                let what = match state {
                    LayerState::Downloading { .. } => return,
                    LayerState::Cached => "already present".to_string(),
                    LayerState::Waiting => "waiting for another pull of it".to_string(),
                    LayerState::Retrying { error } => format!("retrying: {error}"),
                    LayerState::Downloaded { resumed_from: 0 } => {
                        format!("downloaded {}", HumanBytes(*size))
                    }
                    LayerState::Downloaded { resumed_from } => format!(
                        "downloaded {} (resumed at {})",
                        HumanBytes(*size),
                        HumanBytes(resumed_from)
                    ),
                    LayerState::Unpacked => "unpacked".to_string(),
                };
                eprintln!(
                    "  layer {}/{} {}: {what}",
                    index + 1,
                    layers.len(),
                    short(digest)
                );
            }
        }
    }
}

/// One progress bar per layer.
struct Bars {
    multi: MultiProgress,
    bars: Mutex<Vec<ProgressBar>>,
}

impl Bars {
    fn new() -> Bars {
        Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            bars: Mutex::new(Vec::new()),
        }
    }
}

impl PullProgress for Bars {
    fn event(&self, event: PullEvent) {
        let mut bars = self.bars.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            PullEvent::Resolved { layers, .. } => {
                let style = ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}",
                )
                .expect("a valid template")
                .progress_chars("=> ");
                for (digest, size) in layers {
                    let bar = self.multi.add(ProgressBar::new(size));
                    bar.set_style(style.clone());
                    bar.set_prefix(short(&digest));
                    bar.set_message("waiting");
                    bars.push(bar);
                }
            }
            PullEvent::Layer { index, state } => {
                let Some(bar) = bars.get(index) else { return };
                match state {
                    LayerState::Cached => {
                        bar.set_position(bar.length().unwrap_or(0));
                        bar.finish_with_message("already present");
                    }
                    LayerState::Waiting => bar.set_message("another pull is downloading it"),
                    LayerState::Downloading { done, .. } => {
                        if bar.position() == 0 {
                            bar.set_message("downloading");
                        }
                        bar.set_position(done);
                    }
                    LayerState::Retrying { error } => bar.set_message(format!("retrying: {error}")),
                    LayerState::Downloaded { .. } => {
                        bar.set_position(bar.length().unwrap_or(0));
                        bar.set_message("unpacking");
                    }
                    LayerState::Unpacked => bar.finish_with_message("done"),
                }
            }
        }
    }
}
