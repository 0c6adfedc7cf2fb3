//! `nexusctl`: the command-line interface to nexus.
//!
//! Exit codes: 0 success, 1 error, 2 usage.

mod access;
mod apply;
mod cli;
mod commands;
mod config;
mod context;
mod diagnose;
mod explain;
mod follow;
mod fork;
mod get;
mod import;
mod jsonpath;
mod kinds;
mod manifest;
mod observe;
mod progress;
mod render;
mod rollout;

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use cli::*;
use commands::{Selection, WaitFor};
use context::{Context, Failure};
use get::GetOptions;

fn context(cli: &Cli) -> Result<Context, Failure> {
    let cfg = config::Config::load().map_err(Failure::error)?;
    let ctx = cfg.context(cli.context.as_deref()).map_err(Failure::usage)?;
    let server = cli
        .server
        .clone()
        .or_else(|| ctx.and_then(|c| c.server.clone()))
        .unwrap_or_else(|| config::DEFAULT_SERVER.into());
    let token = cli.token.clone().or_else(|| ctx.and_then(|c| c.token.clone()));
    let project = cli
        .project
        .clone()
        .or_else(|| ctx.and_then(|c| c.project.clone()))
        .unwrap_or_else(|| nexus_api::DEFAULT_PROJECT.into());
    let ca = cli.certificate_authority.clone().or_else(|| ctx.and_then(|c| c.certificate_authority.clone()));
    let trust = nexus_client::tls::Trust::ca_file_or_system(ca.as_deref()).map_err(|e| {
        Failure::usage(format!("{e}; set --certificate-authority or the context's certificateAuthority"))
    })?;
    Ok(Context { client: nexus_client::Client::with_trust(&server, token, trust), project })
}

fn power_selection(a: &PowerArgs) -> Result<Selection<'_>, Failure> {
    if kinds::resolve(&a.kind).map_err(Failure::usage)?.kind != <nexus_api::VmSpec as nexus_api::ResourceSpec>::KIND {
        return Err(Failure::usage(format!("only VMs have a power state, not {}", a.kind)));
    }
    Ok(Selection { kind: Some(&a.kind), names: &a.names, files: &[], labels: a.selector.as_deref(), all: false })
}

fn config_command(cli: &Cli, cmd: &ConfigCommand) -> Result<(), Failure> {
    let mut cfg = config::Config::load().map_err(Failure::error)?;
    match cmd {
        ConfigCommand::GetContexts => {
            println!("{:<9}{:<20}{:<32}PROJECT", "CURRENT", "NAME", "SERVER");
            for c in &cfg.contexts {
                let cur = if cfg.current_context.as_deref() == Some(c.name.as_str()) { "*" } else { "" };
                println!(
                    "{cur:<9}{:<20}{:<32}{}",
                    c.name,
                    c.server.as_deref().unwrap_or(""),
                    c.project.as_deref().unwrap_or("")
                );
            }
        }
        ConfigCommand::CurrentContext => match &cfg.current_context {
            Some(c) => println!("{c}"),
            None => return Err(Failure::error("no current context is set; use `nexusctl config use-context NAME`")),
        },
        ConfigCommand::UseContext { name } => {
            cfg.context(Some(name)).map_err(Failure::usage)?;
            cfg.current_context = Some(name.clone());
            cfg.save().map_err(Failure::error)?;
            println!("Switched to context \"{name}\".");
        }
        ConfigCommand::SetContext { name } => {
            let (server, token, project) = (&cli.server, &cli.token, &cli.project);
            let entry = match cfg.contexts.iter_mut().find(|c| c.name == *name) {
                Some(c) => c,
                None => {
                    cfg.contexts.push(config::Context { name: name.clone(), ..Default::default() });
                    cfg.contexts.last_mut().expect("just pushed")
                }
            };
            if server.is_some() {
                entry.server = server.clone();
            }
            if let Some(ca) = &cli.certificate_authority {
                // Kept absolute, so the context works from any directory.
                let ca = std::fs::canonicalize(ca)
                    .map_err(|e| Failure::usage(format!("--certificate-authority {}: {e}", ca.display())))?;
                nexus_client::tls::Trust::ca_file(&ca).map_err(|e| Failure::usage(e.to_string()))?;
                entry.certificate_authority = Some(ca);
            }
            if token.is_some() {
                entry.token = token.clone();
            }
            if project.is_some() {
                entry.project = project.clone();
            }
            if cfg.current_context.is_none() {
                cfg.current_context = Some(name.clone());
            }
            cfg.save().map_err(Failure::error)?;
            println!("Context \"{name}\" set in {}.", config::path().display());
        }
    }
    Ok(())
}

async fn run(cli: &Cli) -> Result<(), Failure> {
    match &cli.command {
        Command::Config(cmd) => return config_command(cli, cmd),
        Command::Completion { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "nexusctl", &mut std::io::stdout());
            return Ok(());
        }
        Command::Explain { target } => {
            let mut parts = target.split('.');
            let kind = kinds::resolve(parts.next().unwrap_or_default()).map_err(Failure::usage)?;
            let path: Vec<&str> = parts.collect();
            print!("{}", explain::explain(kind, &path).map_err(Failure::error)?);
            return Ok(());
        }
        _ => {}
    }
    let ctx = context(cli)?;
    match &cli.command {
        Command::Apply { files, dry_run, prune, selector, output } => {
            let prune = if *prune { selector.as_deref() } else { None };
            apply::apply(&ctx, files, dry_run.as_deref() == Some("server"), prune, output.as_deref()).await
        }
        Command::Get { kind, names, output, selector, field_selector, all_projects, watch } => {
            let o = GetOptions {
                output: output.as_deref(),
                labels: selector.as_deref(),
                fields: field_selector.as_deref(),
                all_projects: *all_projects,
                watch: *watch,
            };
            get::get(&ctx, kind, names, &o).await
        }
        Command::Describe { kind, name } => commands::describe(&ctx, kind, name).await,
        Command::Delete { kind, names, files, selector, all, wait, timeout } => {
            let sel = Selection { kind: kind.as_deref(), names, files, labels: selector.as_deref(), all: *all };
            commands::delete(&ctx, &sel, *wait, Duration::from_secs(*timeout)).await
        }
        Command::Wait { kind, name, for_, timeout } => {
            let cond = WaitFor::parse(for_).map_err(Failure::usage)?;
            commands::wait(&ctx, kind, name, &cond, Duration::from_secs(*timeout)).await
        }
        Command::Diff { files, exit_code } => {
            let changed = apply::diff(&ctx, files).await?;
            if changed && *exit_code { Err(Failure { code: 1, message: String::new() }) } else { Ok(()) }
        }
        Command::Start(a) => commands::power(&ctx, "Running", "started", &power_selection(a)?, a.wait()).await,
        Command::Stop(a) => commands::power(&ctx, "Stopped", "stopped", &power_selection(a)?, a.wait()).await,
        Command::Pause(a) => commands::power(&ctx, "Paused", "paused", &power_selection(a)?, a.wait()).await,
        Command::Resume(a) => commands::power(&ctx, "Running", "resumed", &power_selection(a)?, a.wait()).await,
        Command::Snapshot { vm, name, stay_paused, wait, timeout } => {
            let wait = wait.then(|| Duration::from_secs(*timeout));
            commands::snapshot(&ctx, vm, name, *stay_paused, wait).await
        }
        Command::Restore { snapshot, new_vm, paused, wait, timeout } => {
            let wait = wait.then(|| Duration::from_secs(*timeout));
            commands::restore(&ctx, snapshot, new_vm, *paused, wait).await
        }
        Command::Fork { vm, copies, wait, timeout } => {
            let wait = wait.then(|| Duration::from_secs(*timeout));
            fork::fork(&ctx, vm, *copies, wait).await
        }
        Command::Scale { kind, name, replicas } => {
            rollout::pool_kind(kind, "replicas")?;
            rollout::scale(&ctx, name, *replicas).await
        }
        Command::Rollout(r) => match r {
            RolloutCommand::Status { kind, name, watch, timeout } => {
                rollout::pool_kind(kind, "rollouts")?;
                rollout::status(&ctx, name, *watch, Duration::from_secs(*timeout)).await
            }
            RolloutCommand::History { kind, name, revision } => {
                rollout::pool_kind(kind, "rollouts")?;
                rollout::history(&ctx, name, *revision).await
            }
            RolloutCommand::Pause { kind, name } => {
                rollout::pool_kind(kind, "rollouts")?;
                rollout::set_paused(&ctx, name, true).await
            }
            RolloutCommand::Resume { kind, name } => {
                rollout::pool_kind(kind, "rollouts")?;
                rollout::set_paused(&ctx, name, false).await
            }
            RolloutCommand::Undo { kind, name, to_revision } => {
                rollout::pool_kind(kind, "rollouts")?;
                rollout::undo(&ctx, name, *to_revision).await
            }
        },
        Command::Logs { kind, name, follow, tail, vmm, since } => {
            let o = observe::LogOptions { follow: *follow, tail: *tail, vmm: *vmm, since: since.as_deref() };
            observe::logs(&ctx, kind, name, &o).await
        }
        Command::Top(TopCommand::Vms { all_projects, drives }) => observe::top_vms(&ctx, *all_projects, *drives).await,
        Command::Top(TopCommand::Nodes) => observe::top_nodes(&ctx).await,
        Command::Version => commands::version(&ctx).await,
        Command::Whoami => access::whoami(&ctx).await,
        Command::Image(ImageCommand::Import { name, from, type_, size_mib, node_path }) => {
            let type_ = match type_.as_str() {
                "Kernel" => nexus_api::image::ImageType::Kernel,
                "Initrd" => nexus_api::image::ImageType::Initrd,
                _ => nexus_api::image::ImageType::Rootfs,
            };
            let o = import::ImportOptions { from, type_, size_mib: *size_mib, node_path: node_path.as_deref() };
            import::import(&ctx, name, &o).await
        }
        Command::Token(t) => match t {
            TokenCommand::Create { subject, description, ttl, output } => {
                access::create(&ctx, subject.as_deref(), description, ttl.as_deref(), output).await
            }
            TokenCommand::List { subject, output } => access::list(&ctx, subject.as_deref(), output).await,
            TokenCommand::Revoke { id } => access::revoke(&ctx, id).await,
            TokenCommand::Rotate { id, grace, output } => access::rotate(&ctx, id, grace.as_deref(), output).await,
        },
        Command::Audit { kind, name, actor, result, since, all_projects, output } => {
            let o = access::AuditOptions {
                kind: kind.as_deref(),
                name: name.as_deref(),
                actor: actor.as_deref(),
                result: result.as_deref(),
                since: since.as_deref(),
                all_projects: *all_projects,
                output,
            };
            access::audit(&ctx, &o).await
        }
        Command::Config(_) | Command::Completion { .. } | Command::Explain { .. } => Ok(()),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // clap exits with 2 on usage errors and 0 for --help.
    let cli = Cli::parse();
    let request_id = cli.request_id.clone().unwrap_or_else(nexus_client::trace::new_id);
    if !nexus_client::trace::is_sane(&request_id) {
        eprintln!("error: --request-id must be 1 to 64 printable ASCII characters without spaces");
        return ExitCode::from(2);
    }
    match nexus_client::trace::scope(request_id, run(&cli)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if !f.message.is_empty() {
                eprintln!("error: {}", f.message);
            }
            ExitCode::from(f.code)
        }
    }
}
