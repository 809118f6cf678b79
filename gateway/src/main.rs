//! The `gateway` command. Everything but argument parsing and process
//! set-up lives in the library.

/// mimalloc returns freed memory to the system a few milliseconds after a
/// burst; glibc's allocator kept hundreds of MiB after one large request
/// (RSS 39 MB before, 376 MB an hour later).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    gateway::process::tune_allocator();
    gateway::cli::main()
}
