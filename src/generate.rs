//! Man pages and shell completions, generated from the clap definitions (one source of truth).
//! `herdsman generate DIR` writes `DIR/man/*.1` and `DIR/completions/{herdsman.bash,_herdsman,
//! herdsman.fish}`; the packages call it at build time.

use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

pub fn write_all(dir: &Path) -> std::io::Result<()> {
    let man = dir.join("man");
    let comp = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&comp)?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man)?;
    for (shell, file) in
        [(Shell::Bash, "herdsman.bash"), (Shell::Zsh, "_herdsman"), (Shell::Fish, "herdsman.fish")]
    {
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), "herdsman", &mut buf);
        std::fs::write(comp.join(file), buf)?;
    }
    Ok(())
}
