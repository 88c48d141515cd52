//! The `herdsman` binary: reads argv and the environment once (`herdsman::app::Process`),
//! hands them to the library (`herdsman::app::main`), and turns its answer into an exit code
//! (see `herdsman::exit`).

use std::process::ExitCode;

use herdsman::app::{self, Process};

fn main() -> ExitCode {
    app::ensure_stdio_open();
    let process = Process {
        args: std::env::args_os().collect(),
        vars: std::env::vars_os().collect(),
        exe: std::env::current_exe().ok(),
    };
    match app::main(&process) {
        Ok(()) => ExitCode::from(herdsman::exit::OK as u8),
        Err(f) => {
            app::report(&f);
            ExitCode::from(f.code as u8)
        }
    }
}
