//! The `plaza` binary: configuration → logging → server, until Ctrl-C or SIGTERM.
//! `plaza token …` prints an access token instead.

use plaza::config::{Config, ConfigError, Invocation, LogFormat, TokenArgs};
use std::process::ExitCode;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, fmt};

fn main() -> ExitCode {
    let config = match Config::load_invocation() {
        Ok(Invocation::Serve(config)) => *config,
        Ok(Invocation::Token(args)) => return print_token(&args),
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
    match plaza::server::raise_nofile_limit() {
        Some((soft, hard)) => {
            let needed = (config.max_connections + plaza::http::limits::RESERVE) as u64
                + plaza::server::FD_MARGIN;
            if soft < needed {
                tracing::warn!(
                    soft,
                    hard,
                    needed,
                    "the open-file limit is below what --max-connections needs: the connection \
                     cap will be lowered to fit (raise the hard limit: ulimit -Hn, systemd \
                     LimitNOFILE, compose `ulimits: nofile`)"
                );
            } else {
                tracing::info!(soft, hard, "open-file limit");
            }
        }
        None => tracing::warn!("cannot read the open-file limit (RLIMIT_NOFILE)"),
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

/// `plaza token`: the token on stdout (nothing else, for `$(plaza token …)`), errors on stderr.
#[allow(clippy::print_stdout)] // printing the token is what the command is for
fn print_token(args: &TokenArgs) -> ExitCode {
    match args.mint() {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("plaza token: {e}");
            ExitCode::from(2)
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
    // The most verbose level anything is logged at: `log` records (webrtc-rs logs through the
    // `log` crate, some per packet) above it are dropped by `log`'s own cheap check instead
    // of reaching the filter.
    let max_level = filter
        .max_level_hint()
        .unwrap_or(tracing_subscriber::filter::LevelFilter::TRACE);
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
    {
        use tracing_log::AsLog;
        tracing_log::log::set_max_level(max_level.as_log());
    }
    Ok(())
}
