//! The `herdsman` binary: reads argv and the environment once (`herdsman::app::Process`),
//! parses the command line, calls the library (`herdsman::app`), and turns its answer into an
//! exit code (see `herdsman::exit`).

use std::process::ExitCode;

use clap::Parser;
use herdsman::app::{self, Process};
use herdsman::cli::Cli;
use herdsman::exit::Failure;
use herdsman::{exit, sys};

fn main() -> ExitCode {
    sys::ensure_stdio_open();
    let process = Process {
        args: std::env::args_os().collect(),
        vars: std::env::vars_os().collect(),
        exe: std::env::current_exe().ok(),
    };
    // The new image of an in-place upgrade: its state, not argv, says what to do.
    if let Some(fd) = process.var(herdsman::env::STATE_VAR) {
        return finish(app::resume(&fd, &process));
    }
    let cli = match Cli::try_parse_from(&process.args) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            herdsman::errln!("herdsman: {first} (see herdsman --help)");
            return code(exit::USAGE);
        }
    };
    finish(app::dispatch(cli.command, &process))
}

/// Prints a failure, lets the last log lines out (bounded), and exits with its code.
fn finish(result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => code(exit::OK),
        Err(f) => {
            for line in &f.lines {
                herdsman::errln!("herdsman: {line}");
            }
            herdsman::logging::flush(std::time::Duration::from_secs(2));
            code(f.code)
        }
    }
}

fn code(c: i32) -> ExitCode {
    ExitCode::from(c as u8)
}
