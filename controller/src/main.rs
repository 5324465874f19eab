//! `baton`: the controller server and the operator CLI. Thin over the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = baton_controller::cli::Cli::parse();
    match baton_controller::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that went away (`baton logs -f | head`): done, quietly.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("baton: {e:#}");
            ExitCode::FAILURE
        }
    }
}
