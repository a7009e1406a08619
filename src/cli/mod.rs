//! The command line: parse flags (clap), run the command, map the outcome to an exit
//! code (0 ok, 2 usage or configuration error, 1 runtime failure). The only module that
//! prints to stdout.
#![allow(clippy::print_stdout, clippy::print_stderr)] // A CLI's output is its interface.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::app::{self, Announce, AppError, Endpoints, Launch};
use crate::config::{self, Config, ConfigErrors, ConfigSources, LogLevel, TlsFiles};
use crate::listener::load_certified_key;
use crate::observe::{BuildInfo, init_logging};

const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("KEEL_GIT_COMMIT"),
    ", ",
    env!("KEEL_BUILD_PROFILE"),
    " build)"
);

#[derive(Debug, Parser)]
#[command(name = "keel", version = VERSION, about = "One binary for a site's backend: cache, job queue, reverse proxy, SQL API, metrics and dashboard.")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service.
    Serve(ConfigArgs),
    /// Check a configuration file: print every problem (exit 2), or the effective
    /// configuration with secrets redacted (exit 0).
    CheckConfig(ConfigArgs),
    /// Run keel with a fresh temporary data directory and print where to look.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
struct ConfigArgs {
    /// Configuration file [default: /etc/keel/keel.toml, if it exists].
    #[arg(long, short = 'c', value_name = "PATH")]
    config: Option<PathBuf>,
    /// Data directory (overrides `data_dir`).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Log level (overrides `log.level`).
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Set any key, e.g. `--set listeners.api.bind=127.0.0.1:3999`. Repeatable; wins
    /// over the file and the environment.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_assignment)]
    sets: Vec<(String, String)>,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Address of the api listener and dashboard.
    #[arg(long, default_value = "127.0.0.1:3100")]
    bind: String,
    /// Keep the temporary data directory after exit.
    #[arg(long)]
    keep: bool,
}

fn parse_assignment(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))?;
    if key.trim().is_empty() {
        return Err("the key is empty".to_owned());
    }
    Ok((key.trim().to_owned(), value.to_owned()))
}

impl ConfigArgs {
    fn sources(&self) -> ConfigSources {
        let mut sets = Vec::new();
        if let Some(dir) = &self.data_dir {
            sets.push(("data_dir".to_owned(), dir.display().to_string()));
        }
        if let Some(level) = &self.log_level {
            sets.push(("log.level".to_owned(), level.clone()));
        }
        sets.extend(self.sets.iter().cloned());
        ConfigSources::from_process(self.config.clone(), sets)
    }
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig(args) => check_config(&args.sources()),
        Command::Serve(args) => {
            let sources = args.sources();
            match load_checked(&sources) {
                Ok(config) => serve(config, sources, None),
                Err(errors) => config_failure(&errors),
            }
        }
        Command::Demo(args) => demo(&args),
    }
}

/// Loads the configuration and checks what the config module cannot: that the
/// certificate files it names load.
fn load_checked(sources: &ConfigSources) -> Result<Config, ConfigErrors> {
    let config = config::load(sources)?;
    let mut problems = Vec::new();
    let listeners = &config.listeners;
    let mut certificates: Vec<(String, &TlsFiles)> = Vec::new();
    if let Some(files) = &listeners.api.tls {
        certificates.push(("listeners.api.tls".to_owned(), files));
    }
    if let Some(files) = &listeners.resp.tls {
        certificates.push(("listeners.resp.tls".to_owned(), files));
    }
    for (index, files) in listeners.gateway.certificates.iter().enumerate() {
        certificates.push((format!("listeners.gateway.certificates[{index}]"), files));
    }
    for (path, files) in certificates {
        if let Err(error) = load_certified_key(files) {
            problems.push(config::Problem {
                path,
                message: error.to_string(),
                origin: config::Origin::Config,
            });
        }
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(problems))
    }
}

fn check_config(sources: &ConfigSources) -> ExitCode {
    match load_checked(sources) {
        Ok(config) => {
            let file = sources
                .file_path()
                .map(|path| path.display().to_string())
                .unwrap_or_else(|| "built-in defaults".to_owned());
            println!(
                "# {file}: configuration is valid. Effective configuration (secrets redacted):"
            );
            print!("{}", config.to_redacted_toml());
            ExitCode::SUCCESS
        }
        Err(errors) => config_failure(&errors),
    }
}

fn config_failure(errors: &ConfigErrors) -> ExitCode {
    eprintln!(
        "keel: invalid configuration ({} problem{}):",
        errors.0.len(),
        if errors.0.len() == 1 { "" } else { "s" }
    );
    for problem in &errors.0 {
        eprintln!("  {problem}");
    }
    ExitCode::from(2)
}

fn serve(config: Config, sources: ConfigSources, announce: Option<Announce>) -> ExitCode {
    let log = init_logging(config.log.level, config.log.format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keel")
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("keel: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let outcome = runtime.block_on(app::run(
        config,
        Launch {
            sources,
            log,
            announce,
        },
    ));
    // Tasks still running (idle keep-alive connections past the drain) end here.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "keel stopped with an error");
            eprintln!("keel: {error}");
            ExitCode::from(match error {
                AppError::Config(_) => 2,
                _ => 1,
            })
        }
    }
}

fn demo(args: &DemoArgs) -> ExitCode {
    let data_dir = std::env::temp_dir().join(format!("keel-demo-{}", std::process::id()));
    let sources = ConfigSources {
        explicit_file: None,
        env: Vec::new(),
        sets: vec![
            ("data_dir".to_owned(), data_dir.display().to_string()),
            ("listeners.api.bind".to_owned(), args.bind.clone()),
        ],
    };
    // The demo ignores /etc/keel/keel.toml: it must behave the same on every machine.
    let sources = ConfigSources {
        explicit_file: Some(PathBuf::from("/dev/null")),
        ..sources
    };
    let config = match config::load(&sources) {
        Ok(config) => config,
        Err(errors) => return config_failure(&errors),
    };
    let config = Config {
        log: config::LogConfig {
            level: LogLevel::Info,
            ..config.log.clone()
        },
        ..config
    };
    let announce_dir = data_dir.clone();
    let announce = Box::new(move |endpoints: &Endpoints| {
        let base = format!(
            "{}://{}",
            if endpoints.api_tls { "https" } else { "http" },
            endpoints.api
        );
        println!();
        println!("keel demo is running ({})", BuildInfo::CURRENT.version);
        println!("  api:        {base}/");
        println!("  health:     {base}/healthz   readiness: {base}/readyz");
        println!("  metrics:    {base}/metrics");
        if let Some(resp) = endpoints.resp {
            println!(
                "  cache:      {base}/v1/cache/KEY   redis-cli -h {} -p {}",
                resp.ip(),
                resp.port()
            );
        }
        println!("  data dir:   {} (temporary)", announce_dir.display());
        println!("Press Ctrl-C to stop.");
        println!();
    });
    let code = serve(config, sources, Some(announce));
    if !args.keep {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    code
}
