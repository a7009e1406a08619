//! `keel`: see `keel --help`. Everything happens in the library; this only hands the
//! exit code back to the shell.

/// mimalloc instead of the C library's allocator: the proxy, cache and queue allocate
/// many small short-lived buffers per request, where glibc's malloc showed up at ~15 %
/// of the gateway's CPU; musl's allocator (the static build) is slower still.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keel::cli::main()
}
