//! The `bhatti` binary: the daemon (`bhatti serve`), host administration
//! (`bhatti user …`, `bhatti admin status`) and the API client (everything
//! else). See `bhatti --help` and the README's CLI reference.

mod cli;

use clap::Parser;

fn main() {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => std::process::exit(usage_error(e)),
    };
    let status = cli::run(cli);
    // `exit`, not a return: a blocking stdin read on another thread (shell)
    // must not keep the process alive.
    std::process::exit(status.code());
}

/// Help and version go to stdout with 0; a usage error is one line on
/// stderr with exit code 2.
fn usage_error(e: clap::Error) -> i32 {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                2
            } else {
                0
            }
        }
        _ => {
            // The first paragraph ("error: …" and any lines under it), as one line.
            let rendered = e.render().to_string();
            let first: Vec<&str> = rendered
                .lines()
                .map(str::trim)
                .skip_while(|l| l.is_empty())
                .take_while(|l| !l.is_empty())
                .collect();
            let first = first.join(" ");
            let first = first.strip_prefix("error: ").unwrap_or(&first);
            eprintln!("bhatti: {first} (see `bhatti --help`)");
            2
        }
    }
}
