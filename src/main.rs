//! The `plaza` binary: configuration → logging → server, until Ctrl-C or SIGTERM.

use plaza::config::{Config, ConfigError, LogFormat};
use std::process::ExitCode;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, fmt};

fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(config) => config,
        // `--help`, `--version` and bad flags: clap prints and picks the exit code.
        Err(ConfigError::Cli(e)) => e.exit(),
        Err(e) => {
            eprintln!("plaza: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = init_tracing(&config) {
        eprintln!("plaza: cannot set up logging: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("plaza: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(plaza::server::run(config, plaza::server::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logging is set up by now: report there (stdout), not twice.
            tracing::error!("plaza: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &Config) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // webrtc-rs logs connection-setup noise at warn (e.g. a DTLS server-name notice per peer,
    // packets that beat the handshake); keep it out unless the user asks for those targets.
    let directives = if config.log_level.contains("rtc") {
        config.log_level.clone()
    } else {
        format!("rtc=error,rtc_ice=warn,rtc_dtls=error,{}", config.log_level)
    };
    let filter = EnvFilter::try_new(&directives)?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    // Every call site is rate-limited (see `plaza::logging`): bad input must not turn into a
    // log line per packet.
    let filter = filter.and(plaza::logging::RateLimit::default());
    let registry = tracing_subscriber::registry();
    match config.log_format {
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(ansi).with_filter(filter))
            .try_init()?,
        LogFormat::Json => registry
            .with(fmt::layer().json().with_filter(filter))
            .try_init()?,
    }
    Ok(())
}
