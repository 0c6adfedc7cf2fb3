//! `nexusctl`: the command-line interface to nexus.

mod commands;
mod kinds;
mod manifest;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "nexusctl", version, about = "Manage nexus microVMs declaratively")]
struct Cli {
    /// URL of the apiserver.
    #[arg(long, global = true, env = "NEXUS_SERVER", default_value = "http://127.0.0.1:7443")]
    server: String,
    /// Project to work in.
    #[arg(long, short = 'p', global = true, env = "NEXUS_PROJECT", default_value = nexus_api::DEFAULT_PROJECT)]
    project: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update objects from files: prints created, configured or unchanged.
    Apply {
        /// File, directory or `-` for stdin.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
    },
    /// List objects of a kind, or show one.
    Get {
        /// Kind, such as `vms` or `nodes`.
        kind: String,
        /// Name of one object.
        name: Option<String>,
        /// Output format: table (default), wide, yaml, json or name.
        #[arg(short = 'o', long)]
        output: Option<String>,
        /// List across all projects.
        #[arg(short = 'A', long)]
        all_projects: bool,
    },
    /// Print the client and server versions.
    Version,
    /// Delete an object.
    Delete {
        kind: String,
        name: String,
        /// Wait until the object is gone.
        #[arg(long)]
        wait: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = nexus_api::client::Client::new(&cli.server, None);
    let ctx = commands::Context { client, project: cli.project };
    let result = match cli.command {
        Command::Apply { files } => commands::apply(&ctx, &files).await,
        Command::Get { kind, name, output, all_projects } => {
            commands::get(&ctx, &kind, name.as_deref(), output.as_deref(), all_projects).await
        }
        Command::Delete { kind, name, wait } => commands::delete(&ctx, &kind, &name, wait).await,
        Command::Version => commands::version(&ctx).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
