//! The `gateway` command. Everything but argument parsing and process
//! set-up lives in the library.

fn main() -> std::process::ExitCode {
    gateway::cli::main()
}
