//! The command line: parse flags (clap), run the command, map the outcome to an exit
//! code (0 ok, 2 usage or configuration error, 1 runtime failure). The only module that
//! prints to stdout.
#![allow(clippy::print_stdout, clippy::print_stderr)] // A CLI's output is its interface.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::app::{self, Announce, AppError, Endpoints, Launch};
use crate::config::{self, Config, ConfigErrors, ConfigSources, TlsFiles};
use crate::demo::{DemoOptions, DemoSite, RunningDemo};
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
    /// Apply the site's SQL migrations (`sql.migrations_dir`), or show their state.
    Migrate(MigrateArgs),
    /// Ask the running keel for a consistent backup of its databases into DIR.
    Backup(BackupArgs),
    /// Put a backup in place in the data directory; keel must be stopped.
    Restore(RestoreArgs),
    /// Create, list or revoke api and RESP tokens (works while keel runs).
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token and print it once.
    Create(TokenCreateArgs),
    /// List tokens: name, role, scopes, creation time (never any secret).
    List(ConfigArgs),
    /// Revoke a token; a running keel refuses it within a second.
    Revoke(TokenRevokeArgs),
}

#[derive(Debug, Args)]
struct TokenCreateArgs {
    /// admin, operator or readonly.
    #[arg(long, value_parser = clap::value_parser!(crate::auth::Role))]
    role: crate::auth::Role,
    /// Limit the token to a subsystem (cache, queue, sql, gateway). Repeatable; none
    /// means all.
    #[arg(long = "scope", value_name = "SCOPE", value_parser = clap::value_parser!(crate::auth::Scope))]
    scopes: Vec<crate::auth::Scope>,
    /// A unique name (A-Z a-z 0-9 _ . -, up to 64) [default: the role and a random suffix].
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Debug, Args)]
struct TokenRevokeArgs {
    /// The token's name, as `keel token list` shows it.
    name: String,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Debug, Args)]
struct MigrateArgs {
    /// Only list each migration and whether it is applied, pending or changed.
    #[arg(long)]
    status: bool,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Debug, Args)]
struct BackupArgs {
    /// Directory to write (absolute, empty or absent) on the machine keel runs on.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Debug, Args)]
struct RestoreArgs {
    /// A directory written by `keel backup`.
    #[arg(long, value_name = "DIR")]
    from: PathBuf,
    #[command(flatten)]
    config: ConfigArgs,
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
    /// Address of the Redis-protocol listener.
    #[arg(long, default_value = "127.0.0.1:6380")]
    resp_bind: String,
    /// Address of the gateway (the reverse proxy in front of the demo app).
    #[arg(long, default_value = "127.0.0.1:8090")]
    gateway_bind: String,
    /// Keep the demo's state in DIR (created if missing, reused by the next run)
    /// instead of a temporary directory.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Do not generate traffic; the charts then show only your own requests.
    #[arg(long)]
    no_traffic: bool,
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
        Command::Migrate(args) => with_config(&args.config, |config| migrate(&config, args.status)),
        Command::Backup(args) => with_config(&args.config, |config| backup(&config, &args.out)),
        Command::Restore(args) => with_config(&args.config, |config| restore(&config, &args.from)),
        Command::Token(command) => token(command),
    }
}

/// `keel token ...`: works on `<data_dir>/tokens.json` directly, without the data
/// directory's lock, so it runs next to a serving keel.
fn token(command: TokenCommand) -> ExitCode {
    use crate::auth::TokenStore;
    let config_args = match &command {
        TokenCommand::Create(args) => &args.config,
        TokenCommand::List(args) => args,
        TokenCommand::Revoke(args) => &args.config,
    };
    let config = match config::load(&config_args.sources()) {
        Ok(config) => config,
        Err(errors) => return config_failure(&errors),
    };
    let store = match TokenStore::open(&config.data_dir) {
        Ok(store) => store,
        Err(error) => {
            eprintln!("keel: {error}");
            return ExitCode::from(1);
        }
    };
    let failure = |error: crate::auth::TokenStoreError| {
        eprintln!("keel: {error}");
        match error {
            crate::auth::TokenStoreError::BadName(_)
            | crate::auth::TokenStoreError::NameTaken(_)
            | crate::auth::TokenStoreError::NotFound(_) => ExitCode::from(2),
            _ => ExitCode::from(1),
        }
    };
    match command {
        TokenCommand::Create(args) => match store.create(args.role, args.scopes, args.name) {
            Ok((info, token)) => {
                println!("{token}");
                eprintln!(
                    "created token {:?} (role {}, scopes {}); it is shown only this once",
                    info.name,
                    info.role,
                    scopes_text(&info.scopes)
                );
                ExitCode::SUCCESS
            }
            Err(error) => failure(error),
        },
        TokenCommand::List(_) => match store.list() {
            Ok(tokens) => {
                println!("{:<32} {:<9} {:<26} CREATED", "NAME", "ROLE", "SCOPES");
                for token in tokens {
                    println!(
                        "{:<32} {:<9} {:<26} {}",
                        token.name,
                        token.role,
                        scopes_text(&token.scopes),
                        token.created
                    );
                }
                ExitCode::SUCCESS
            }
            Err(error) => failure(error),
        },
        TokenCommand::Revoke(args) => match store.revoke(&args.name) {
            Ok((info, _)) => {
                println!("revoked token {:?}", info.name);
                ExitCode::SUCCESS
            }
            Err(error) => failure(error),
        },
    }
}

fn scopes_text(scopes: &[crate::auth::Scope]) -> String {
    if scopes.is_empty() {
        return "all".to_owned();
    }
    scopes
        .iter()
        .map(|scope| scope.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn with_config(args: &ConfigArgs, run: impl FnOnce(Config) -> ExitCode) -> ExitCode {
    match config::load(&args.sources()) {
        Ok(config) => run(config),
        Err(errors) => config_failure(&errors),
    }
}

fn migrate(config: &Config, status_only: bool) -> ExitCode {
    let Some(dir) = &config.sql.migrations_dir else {
        eprintln!("keel: sql.migrations_dir is not set; there is nothing to migrate");
        return ExitCode::from(2);
    };
    let url = config.sql.url.expose();
    let outcome = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        migrate_postgres(config, dir, status_only)
    } else {
        migrate_sqlite(config, dir, status_only)
    };
    report_migrations(outcome)
}

/// `keel migrate` on PostgreSQL: `migrations_dir/postgres/` when it exists (as `keel
/// serve` chooses), applied to the primary.
fn migrate_postgres(
    config: &Config,
    dir: &std::path::Path,
    status_only: bool,
) -> Result<Vec<(u32, String, crate::storage::MigrationState)>, String> {
    use crate::sql::{PgSettings, PgSqlBackend, SqlMetrics};
    let dialect = dir.join("postgres");
    let dir = if dialect.is_dir() {
        dialect
    } else {
        dir.to_owned()
    };
    let migrations = crate::storage::migrations_in_dir(&dir).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let sql = &config.sql;
        let backend = PgSqlBackend::open(
            PgSettings {
                url: sql.url.expose().to_owned(),
                replica: None,
                pool_size: 1,
                pool_timeout: sql.pool_timeout.0,
                read_your_writes: sql.read_your_writes.0,
            },
            SqlMetrics::new(&prometheus::Registry::new()),
            crate::observe::Dependency::detached("postgres"),
            None,
        )
        .await
        .map_err(|e| format!("sql.url: {e}"))?;
        if !status_only {
            backend
                .apply_migrations(&migrations)
                .await
                .map_err(|e| e.to_string())?;
        }
        backend
            .migration_status(&migrations)
            .await
            .map_err(|e| e.to_string())
    })
}

fn migrate_sqlite(
    config: &Config,
    dir: &std::path::Path,
    status_only: bool,
) -> Result<Vec<(u32, String, crate::storage::MigrationState)>, String> {
    use crate::storage;
    (|| -> Result<Vec<(u32, String, storage::MigrationState)>, String> {
        let migrations = storage::migrations_in_dir(dir).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| format!("{}: {e}", config.data_dir.display()))?;
        let path = storage::sqlite_path(&config.data_dir, config.sql.url.expose())
            .map_err(|e| e.to_string())?;
        let mut connection = storage::open_sqlite(&path).map_err(|e| e.to_string())?;
        if !status_only {
            storage::apply_migrations(&mut connection, &path, &migrations)
                .map_err(|e| e.to_string())?;
        }
        storage::migration_status(&connection, &migrations).map_err(|e| e.to_string())
    })()
}

fn report_migrations(
    outcome: Result<Vec<(u32, String, crate::storage::MigrationState)>, String>,
) -> ExitCode {
    use crate::storage::MigrationState;
    match outcome {
        Ok(status) => {
            for (version, name, state) in &status {
                let state = match state {
                    MigrationState::Applied => "applied",
                    MigrationState::Pending => "pending",
                    MigrationState::Changed => "CHANGED since it was applied",
                    MigrationState::Missing => "applied, file missing",
                };
                println!("{version:04} {name:<40} {state}");
            }
            let problems = status.iter().any(|(_, _, state)| {
                matches!(state, MigrationState::Changed | MigrationState::Missing)
            });
            if problems {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(error) => {
            eprintln!("keel: {error}");
            ExitCode::from(1)
        }
    }
}

/// Asks the running keel (the api listener of this configuration) for a backup.
fn backup(config: &Config, out: &std::path::Path) -> ExitCode {
    use std::io::{Read, Write};
    let out = match std::path::absolute(out) {
        Ok(path) => path,
        Err(error) => {
            eprintln!("keel: {}: {error}", out.display());
            return ExitCode::from(2);
        }
    };
    let api = &config.listeners.api;
    if api.tls.is_some() {
        eprintln!(
            "keel: the api listener uses TLS; run: curl -X POST https://HOST/v1/admin/backup -d '{{\"dir\": \"{}\"}}'",
            out.display()
        );
        return ExitCode::from(2);
    }
    let Some(mut addr) = api.bind.0 else {
        eprintln!("keel: listeners.api.bind is empty; no keel to ask");
        return ExitCode::from(2);
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let body = serde_json::json!({ "dir": out }).to_string();
    // The password if there is one, else the admin token keel created on its first
    // start with authentication on (readable only by keel's user, like the data).
    let credential = config
        .auth
        .password
        .as_ref()
        .map(|secret| secret.expose().to_owned())
        .or_else(|| {
            std::fs::read_to_string(crate::auth::admin_token_path(&config.data_dir))
                .ok()
                .map(|token| token.trim().to_owned())
        });
    let auth = credential
        .map(|secret| format!("Authorization: Bearer {secret}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST /v1/admin/backup HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = (|| -> std::io::Result<String> {
        let mut stream =
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
        stream.write_all(request.as_bytes())?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw)?;
        Ok(raw)
    })();
    match answer {
        Ok(raw) if raw.starts_with("HTTP/1.1 200") => {
            println!("backup written to {}", out.display());
            ExitCode::SUCCESS
        }
        Ok(raw) => {
            let body = raw
                .split_once("\r\n\r\n")
                .map_or(raw.as_str(), |(_, body)| body);
            eprintln!("keel: the backup failed: {body}");
            ExitCode::from(1)
        }
        Err(error) => {
            eprintln!("keel: cannot reach keel at {addr} ({error}); is it running?");
            ExitCode::from(1)
        }
    }
}

/// Copies a backup into the data directory. Holds the data directory's lock, so it
/// refuses while a keel runs there.
fn restore(config: &Config, from: &std::path::Path) -> ExitCode {
    use crate::storage::{self, Storage};
    let data_dir = match Storage::lock(config) {
        Ok(dir) => dir,
        Err(error) => {
            eprintln!("keel: {error}");
            return ExitCode::from(1);
        }
    };
    for file in app::BACKUP_FILES {
        if !from.join(file).is_file() {
            eprintln!(
                "keel: {} has no {file}; is it a keel backup?",
                from.display()
            );
            return ExitCode::from(2);
        }
    }
    let data_sqlite = match storage::sqlite_path(data_dir.path(), config.sql.url.expose()) {
        Ok(path) => path,
        Err(error) => {
            eprintln!("keel: {error}");
            return ExitCode::from(2);
        }
    };
    let targets = [
        ("data.sqlite", data_sqlite),
        ("keel.sqlite", data_dir.path().join("keel.sqlite")),
        ("queue.redb", data_dir.path().join("queue.redb")),
    ];
    for (file, target) in &targets {
        // A WAL left from the old database must not be replayed onto the restored one.
        for suffix in ["-wal", "-shm"] {
            let mut side = target.clone().into_os_string();
            side.push(suffix);
            let _ = std::fs::remove_file(side);
        }
        let staged = target.with_extension("restoring");
        if let Err(error) =
            std::fs::copy(from.join(file), &staged).and_then(|_| std::fs::rename(&staged, target))
        {
            eprintln!("keel: restoring {file} to {}: {error}", target.display());
            return ExitCode::from(1);
        }
        println!("restored {}", target.display());
    }
    let _ = std::fs::remove_file(data_dir.path().join("cache.redb"));
    println!("the cache starts empty; start keel to use the restored data");
    ExitCode::SUCCESS
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
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("keel");
    if config.runtime.worker_threads > 0 {
        builder.worker_threads(config.runtime.worker_threads as usize);
    }
    let runtime = match builder.build() {
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
    let options = DemoOptions {
        api: args.bind.clone(),
        resp: args.resp_bind.clone(),
        gateway: args.gateway_bind.clone(),
        data_dir: args.data.clone(),
        traffic: !args.no_traffic,
    };
    let site = match DemoSite::prepare(&options) {
        Ok(site) => site,
        Err(error) => {
            eprintln!("keel: cannot prepare the demo: {error}");
            return ExitCode::from(1);
        }
    };
    let dir = site.dir.clone();
    let remove_dir = site.temporary && !args.keep;
    // The demo reads only its generated file: /etc/keel/keel.toml and KEEL_* must not
    // make it behave differently from one machine to the next.
    let sources = ConfigSources {
        explicit_file: Some(site.config_path.clone()),
        env: Vec::new(),
        sets: Vec::new(),
    };
    let config = match config::load(&sources) {
        Ok(config) => config,
        Err(errors) => return config_failure(&errors),
    };
    let announce = Box::new(move |endpoints: &Endpoints| {
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let config_path = site.config_path.clone();
            match site.start(endpoints).await {
                Ok(running) => print_demo(&running, &config_path, remove_dir),
                Err(error) => eprintln!("keel: the demo app cannot start: {error}"),
            }
        });
    });
    let code = serve(config, sources, Some(announce));
    if remove_dir {
        let _ = std::fs::remove_dir_all(&dir);
    }
    code
}

fn print_demo(demo: &RunningDemo, config_path: &std::path::Path, temporary: bool) {
    let token = demo.token.as_deref().unwrap_or("(auth is off)");
    let dir = config_path.parent().unwrap_or(config_path);
    println!();
    println!("keel demo is running ({})", BuildInfo::CURRENT.version);
    println!();
    println!("  Dashboard:    {}/", demo.dashboard);
    println!("  Admin token:  {token}");
    println!(
        "  Data dir:     {}{}",
        dir.display(),
        if temporary {
            " (temporary, removed at exit)"
        } else {
            ""
        }
    );
    println!("  Config:       {}", config_path.display());
    println!("  Demo app:     http://{} (posts and users)", demo.app);
    println!();
    println!("Try:");
    if let Some(gateway) = &demo.gateway {
        println!("  curl -i {gateway}/api/posts/1");
    }
    if let Some(resp) = demo.resp {
        let auth = demo
            .token
            .as_deref()
            .map(|token| format!(" --no-auth-warning -a {token}"))
            .unwrap_or_default();
        println!(
            "  redis-cli -h {} -p {}{auth} GET demo:hello",
            resp.ip(),
            resp.port()
        );
    }
    let authorization = demo
        .token
        .as_deref()
        .map(|token| format!(" -H 'Authorization: Bearer {token}'"))
        .unwrap_or_default();
    println!(
        "  curl{authorization} -H 'Content-Type: application/json' -d '{{\"payload\":{{\"to\":\"ada@example.com\"}}}}' {}/v1/queues/email/jobs",
        demo.dashboard
    );
    println!();
    println!("Press Ctrl-C to stop.");
    println!();
}
