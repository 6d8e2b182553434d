//! `ringport client`: the book's echo client and a verifying load generator.

use std::process::ExitCode;

pub mod book;
pub mod errors;
pub mod load;
pub mod payload;
pub mod stats;

/// Runs the book's client with the command line's options.
pub fn run_book(args: &crate::ClientArgs) -> Result<ExitCode, String> {
    let opts = book::BookOptions {
        count: args.count,
        message: args.message.clone(),
        send_only: args.send_only,
        limit: args.timeout,
        ..book::BookOptions::new(args.connect)
    };
    let mut out = std::io::stdout().lock();
    book::run(&opts, &mut out).map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}
