//! `cove image …` and the resolution of `--image REF` for `cove run`: the binary's side of the
//! image store (`cove-image`). The jail never sees references, only unpacked layer directories.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use cove_image::{ImageRecord, PinnedLayers, Reference, SANDBOX_ID_BASE, Store, StoreError};
use cove_types::{EnvVar, Spec, User};
use indicatif::HumanBytes;

/// Where images live.
pub const STORE_ROOT: &str = cove_image::store::DEFAULT_ROOT;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Pull an image from a registry (Docker Hub names, `host:port/name:tag`, `name@sha256:…`).
    #[command(
        after_help = "Layers download in parallel and are unpacked as they arrive; an \
        interrupted pull resumes where it stopped; two pulls of one image download it once.\n\n\
        Examples:\n  cove image pull busybox\n  cove image pull localhost:5000/team/app:v1\n  \
        cove image pull --ca ./registry-ca.pem registry.internal:443/app@sha256:…\n  \
        COVE_REGISTRY_CREDS=ci:token cove image pull registry.internal/app:v2"
    )]
    Pull {
        /// The image reference.
        reference: String,
        /// No progress output.
        #[arg(short, long)]
        quiet: bool,
        #[command(flatten)]
        registry: crate::pull::RegistryArgs,
    },
    /// Import an OCI image layout (directory or tar) or a `docker save` / `podman save` archive.
    Import {
        /// The layout directory or archive (plain, gzip or zstd).
        path: PathBuf,
        /// Name for images the archive leaves unnamed (e.g. `myapp:v1`).
        #[arg(long, value_name = "REF")]
        tag: Option<String>,
    },
    /// List stored images.
    Ls {
        /// One JSON object per image, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Show an image's record: digests, layers, and how it runs.
    Inspect {
        /// The image reference.
        reference: String,
    },
    /// Remove an image's name (its layers go with `cove image prune`).
    Rm {
        /// The image reference.
        reference: String,
    },
    /// Remove blobs and unpacked layers no image names any more.
    Prune,
}

/// Overrides [`STORE_ROOT`] (for tests, benchmarks, and nodes that keep images elsewhere).
pub const STORE_ENV: &str = "COVE_IMAGE_STORE";

pub fn open_store() -> anyhow::Result<Store> {
    let root = std::env::var_os(STORE_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(STORE_ROOT), PathBuf::from);
    Store::open(&root, SANDBOX_ID_BASE).with_context(|| format!("image store {}", root.display()))
}

pub(crate) fn parse_ref(s: &str) -> anyhow::Result<Reference> {
    Ok(s.parse::<Reference>()?)
}

/// `cove image …`.
pub fn image(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    let store = open_store()?;
    match cmd {
        ImageCommand::Pull {
            reference,
            quiet,
            registry,
        } => {
            let r = crate::pull::pull(&store, &parse_ref(&reference)?, &registry, quiet)?;
            println!("pulled {} ({})", r.reference, r.config_digest);
        }
        ImageCommand::Import { path, tag } => {
            let records = cove_image::import(&store, &path, tag.as_deref())
                .with_context(|| format!("import {}", path.display()))?;
            for r in records {
                println!("imported {} ({})", r.reference, r.config_digest);
            }
        }
        ImageCommand::Ls { json } => {
            let images = store.images()?;
            if json {
                for r in &images {
                    println!("{}", serde_json::to_string(&summary(&store, r))?);
                }
            } else {
                println!(
                    "{:<40} {:<14} {:>6} {:>10}",
                    "IMAGE", "ID", "LAYERS", "SIZE"
                );
                for r in &images {
                    let s = summary(&store, r);
                    println!(
                        "{:<40} {:<14} {:>6} {:>10}",
                        r.reference.to_string(),
                        &r.config_digest.hex()[..12],
                        r.layers.len(),
                        HumanBytes(s["size_bytes"].as_u64().unwrap_or(0)).to_string()
                    );
                }
            }
        }
        ImageCommand::Inspect { reference } => {
            let r = store.image(&parse_ref(&reference)?)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        ImageCommand::Rm { reference } => {
            let r = store.remove_image(&parse_ref(&reference)?)?;
            println!("removed {}", r.reference);
        }
        ImageCommand::Prune => {
            let p = store.prune()?;
            println!(
                "removed {} blobs and {} unpacked layers, {} freed",
                p.blobs_removed,
                p.layers_removed,
                HumanBytes(p.bytes_freed)
            );
            if p.layers_in_use > 0 {
                println!(
                    "kept {} unpacked layers that running sandboxes use; a later prune removes them",
                    p.layers_in_use
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn summary(store: &Store, r: &ImageRecord) -> serde_json::Value {
    let size: u64 = r
        .layers
        .iter()
        .filter_map(|d| store.blob_size(d).ok())
        .sum();
    serde_json::json!({
        "reference": r.reference.to_string(),
        "id": r.config_digest.to_string(),
        "layers": r.layers.len(),
        "size_bytes": size,
    })
}

/// When `cove run` pulls an image reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PullPolicy {
    /// Only when the image is not stored.
    Missing,
    /// Every time, so a tag that moved is followed.
    Always,
    /// Never: a missing image is an error.
    Never,
}

/// What `cove run` takes from the flags, to be combined with an image's defaults.
pub struct Overrides {
    pub cmd_given: bool,
    pub workdir_given: bool,
    pub user_given: bool,
}

/// Resolves `reference` to its unpacked layers and applies the image's run configuration to
/// `spec` the way `docker run` does: `Entrypoint` + (the command given, or `Cmd`); the image's
/// `Env` under the flags'; its `WorkingDir` and `User` unless flags set them.
pub fn resolve(
    reference: &str,
    spec: &mut Spec,
    given: &Overrides,
    policy: PullPolicy,
    registry: &crate::pull::RegistryArgs,
) -> anyhow::Result<PinnedLayers> {
    let store = open_store()?;
    let reference = parse_ref(reference)?;
    let record = match (policy, store.image(&reference)) {
        (PullPolicy::Always, _) | (PullPolicy::Missing, Err(StoreError::NoSuchImage { .. })) => {
            crate::pull::pull(&store, &reference, registry, false)?
        }
        (_, stored) => stored?,
    };
    let pinned = store
        .pin_layers(&record)
        .with_context(|| format!("unpack the layers of {}", record.reference))?;
    let layers = &pinned.dirs;
    let c = &record.config;
    let args = if given.cmd_given {
        spec.cmd.clone()
    } else {
        c.cmd.clone()
    };
    spec.cmd = c.entrypoint.iter().cloned().chain(args).collect();
    if spec.cmd.is_empty() {
        bail!(
            "{} has no Entrypoint or Cmd: give a command after --",
            record.reference
        );
    }
    let mut env: Vec<EnvVar> = c.env.iter().filter_map(|e| e.parse().ok()).collect();
    env.retain(|e| !spec.env.iter().any(|s| s.key == e.key));
    env.append(&mut spec.env);
    spec.env = env;
    if !given.workdir_given
        && let Some(w) = &c.working_dir
        && !w.is_empty()
    {
        spec.workdir = Some(PathBuf::from(w));
    }
    if !given.user_given
        && let Some(u) = &c.user
        && !u.is_empty()
    {
        spec.user = image_user(u, layers).with_context(|| format!("the image's User {u:?}"))?;
    }
    Ok(pinned)
}

/// `uid`, `uid:gid`, `name` or `name:group`, names looked up in the image's own
/// `/etc/passwd` and `/etc/group` (the topmost layer that has the file).
fn image_user(spec: &str, layers: &[PathBuf]) -> anyhow::Result<User> {
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let lookup = |file: &str, name: &str| -> anyhow::Result<(u32, Option<u32>)> {
        if let Ok(n) = name.parse::<u32>() {
            return Ok((n, None));
        }
        let text = layers
            .iter()
            .rev()
            .map(|l| l.join("etc").join(file))
            .find(|p| p.symlink_metadata().is_ok_and(|m| m.is_file()))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        for line in text.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.first() == Some(&name) && f.len() > 3 {
                let id = f[2].parse().ok();
                let gid = f[3].parse().ok();
                if let Some(id) = id {
                    return Ok((id, gid));
                }
            }
        }
        bail!("no {name:?} in the image's /etc/{file}")
    };
    let (uid, primary_gid) = lookup("passwd", u)?;
    let gid = match g {
        Some(g) => lookup("group", g)?.0,
        None => primary_gid.unwrap_or(uid),
    };
    let user: User = format!("{uid}:{gid}").parse()?;
    Ok(user)
}
