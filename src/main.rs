//! `keel`: see `keel --help`. Everything happens in the library; this only hands the
//! exit code back to the shell.

fn main() -> std::process::ExitCode {
    keel::cli::main()
}
