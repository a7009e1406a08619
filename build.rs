//! Records the git commit and build profile for `keel --version` and `keel_build_info`,
//! and rebuilds when a dashboard file is added to `web/`.

use std::process::Command;

fn main() {
    let commit = std::env::var("KEEL_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let output = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            output
                .status
                .success()
                .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        });
    println!(
        "cargo:rustc-env=KEEL_GIT_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".to_owned())
    );
    println!(
        "cargo:rustc-env=KEEL_BUILD_PROFILE={}",
        std::env::var("PROFILE").unwrap_or_default()
    );
    println!("cargo:rerun-if-env-changed=KEEL_GIT_COMMIT");
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    // The dashboard's files are embedded (`src/dashboard`); include_bytes! notices a
    // changed file, but only a rerun here notices an added one.
    println!("cargo:rerun-if-changed=web");
}
