//! Command-line flags that the load tester and the benchmark share, flattened into each one's
//! `Args` with `#[command(flatten)]` (and `#[serde(flatten)]`, so the `args` object of their
//! JSON reports keeps its keys).
//!
//! Only flags with the same name, type, default and meaning are here. The benchmark words the
//! data-channel interval's help its own way (`mut_arg` in `examples/bench.rs`). Flags that only
//! share a name (`--duration`, `--timeout`, `--warmup`, `--simulcast`) differ in default, type
//! or help text, and stay in each tool's own `Args`.

use clap::Args;
use plaza::auth::{ApiKey, Secret};
use serde::Serialize;

/// How the synthetic peers join and talk.
#[derive(Args, Debug, Clone, Serialize)]
pub struct PeerArgs {
    /// Data-channel message interval per peer, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub chat_interval_ms: u64,
    /// Peers joining at the same time.
    #[arg(long, default_value_t = 4)]
    pub join_concurrency: usize,
    /// API key the peers' access tokens are signed with, for a server with real keys
    /// (default: the development key)
    #[arg(long, env = "PLAZA_API_KEY", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// Secret of --api-key
    #[arg(long, env = "PLAZA_API_SECRET", hide_env_values = true)]
    #[serde(skip)]
    pub api_secret: Option<Secret>,
    /// Publishers spread each frame's packets at this multiple of the clip's bitrate, as a
    /// browser's pacer does (libwebrtc's factor is 2.5); 0: a frame's packets all at once, the
    /// largest burst a server can get.
    #[arg(long, default_value_t = 0.0, value_name = "FACTOR")]
    pub publisher_pacing: f64,
}

impl PeerArgs {
    /// How publishers send a frame's packets (`--publisher-pacing`).
    pub fn pacing(&self) -> crate::media::Pacing {
        if self.publisher_pacing > 0.0 {
            crate::media::Pacing::Rate(self.publisher_pacing)
        } else {
            crate::media::Pacing::Burst
        }
    }

    /// Sign this process's tokens with `--api-key`/`--api-secret` (if given); call before the
    /// first peer joins.
    pub fn install_signing_key(&self) -> anyhow::Result<()> {
        match (&self.api_key, &self.api_secret) {
            (None, None) => Ok(()),
            (Some(key), Some(secret)) => crate::token::set_signing_key(ApiKey {
                key: key.trim().to_owned(),
                secret: secret.clone(),
            }),
            (Some(_), None) => anyhow::bail!("--api-key needs --api-secret"),
            (None, Some(_)) => anyhow::bail!("--api-secret needs --api-key"),
        }
    }
}

/// Ends a tool's `main` with the outcome of its run: exit status 0 when it passed, 1 when its
/// checks failed, 2 (after printing `<tool>: error: …`) when it could not run.
#[allow(clippy::exit)] // the tools' exit status is their verdict; called last in `main`
pub fn exit_with(tool: &str, outcome: anyhow::Result<bool>) {
    match outcome {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("{tool}: error: {e:#}");
            std::process::exit(2);
        }
    }
}
