//! `nexusctl`: the command-line interface to nexus.
//!
//! Exit codes: 0 success, 1 error, 2 usage.

mod access;
mod apply;
mod commands;
mod config;
mod context;
mod explain;
mod import;
mod jsonpath;
mod kinds;
mod manifest;
mod observe;
mod render;
mod rollout;

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use commands::{GetOptions, Selection, WaitFor};
use context::{Context, Failure};

#[derive(Debug, Parser)]
#[command(name = "nexusctl", version, about = "Manage nexus microVMs declaratively", propagate_version = true)]
struct Cli {
    /// URL of the apiserver (default: the context's, else https://127.0.0.1:7443).
    #[arg(long, global = true, env = "NEXUS_SERVER")]
    server: Option<String>,
    /// CA certificate (PEM) the apiserver's certificate is checked against
    /// (default: the context's, else the system's roots).
    #[arg(long, global = true, env = "NEXUS_CA_FILE")]
    certificate_authority: Option<std::path::PathBuf>,
    /// Bearer token for the apiserver.
    #[arg(long, global = true, env = "NEXUS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Project to work in (default: the context's, else `default`).
    #[arg(long, short = 'p', global = true, env = "NEXUS_PROJECT")]
    project: Option<String>,
    /// Context from the config file to use instead of the current one.
    #[arg(long, global = true, env = "NEXUS_CONTEXT")]
    context: Option<String>,
    /// Id sent as X-Request-Id with every request of this command (default:
    /// a fresh one): the apiserver, the controller and the node agents log
    /// their work on the request under it.
    #[arg(long, global = true)]
    request_id: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Make Image NAME from a root filesystem directory, a tarball (plain or
    /// gzip), an OCI image layout or an ext4 file (or, with --type Kernel,
    /// a kernel), and upload it: nodes download it when a VM needs it and
    /// check its sha256. Building an ext4 image needs mkfs.ext4 (e2fsprogs).
    Import {
        name: String,
        /// The directory, tarball, OCI layout directory or file.
        #[arg(long)]
        from: std::path::PathBuf,
        /// Rootfs, Kernel or Initrd.
        #[arg(long = "type", default_value = "Rootfs", value_parser = ["Rootfs", "Kernel", "Initrd"])]
        type_: String,
        /// Size of the ext4 image in MiB (default: its content and a margin).
        #[arg(long)]
        size_mib: Option<u64>,
        /// Where nodes keep the file (default:
        /// /var/lib/nexus/images/PROJECT/NAME-SHA.ext4); must be under their
        /// --image-root.
        #[arg(long)]
        node_path: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update objects from files; prints created, configured or unchanged.
    Apply {
        /// File, directory (recursive) or `-` for stdin; YAML or JSON, multi-document.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
        /// `server`: validate on the server without storing anything.
        #[arg(long, value_parser = ["server", "none"])]
        dry_run: Option<String>,
        /// Delete objects matching -l that the files no longer contain.
        #[arg(long, requires = "selector")]
        prune: bool,
        /// Label selector for --prune.
        #[arg(short = 'l', long)]
        selector: Option<String>,
    },
    /// List objects of a kind, or show some by name.
    Get {
        /// vms, templates, images, snapshots, nodes or events.
        kind: String,
        names: Vec<String>,
        /// wide, yaml, json, name or jsonpath=TEMPLATE.
        #[arg(short = 'o', long)]
        output: Option<String>,
        /// Label selector: a=b,c!=d,e,!f.
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// Field selector: spec.nodeName=X,status.phase=Running.
        #[arg(long)]
        field_selector: Option<String>,
        /// Across all projects.
        #[arg(short = 'A', long)]
        all_projects: bool,
        /// After listing, print changes as they happen.
        #[arg(short = 'w', long)]
        watch: bool,
    },
    /// Show an object's spec, status, conditions and recent events.
    Describe { kind: String, name: String },
    /// Delete objects by name, from files or by label.
    Delete {
        kind: Option<String>,
        names: Vec<String>,
        #[arg(short = 'f', long = "filename")]
        files: Vec<String>,
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// Return only once the objects are gone.
        #[arg(long)]
        wait: bool,
        /// Seconds to wait with --wait.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Wait for a condition on one object.
    Wait {
        kind: String,
        name: String,
        /// condition=TYPE[=STATUS], jsonpath={.path}=VALUE or delete.
        #[arg(long = "for")]
        for_: String,
        /// Seconds before giving up (exit 1).
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Show what apply would change, as a unified diff.
    Diff {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<String>,
        /// Exit 1 when there are differences.
        #[arg(long)]
        exit_code: bool,
    },
    /// Document a kind or one of its fields: `explain vm.spec.network`.
    Explain { target: String },
    /// Set spec.state to Running.
    Start(PowerArgs),
    /// Set spec.state to Stopped.
    Stop(PowerArgs),
    /// Set spec.state to Paused.
    Pause(PowerArgs),
    /// Set spec.state to Running (from Paused).
    Resume(PowerArgs),
    /// Take a snapshot of a VM: writes a Snapshot object NAME of VM.
    Snapshot {
        vm: String,
        name: String,
        /// Leave the VM paused afterwards (its spec.state becomes Paused).
        #[arg(long)]
        stay_paused: bool,
        /// Return only once the snapshot is Ready (or failed).
        #[arg(long)]
        wait: bool,
        /// Seconds --wait waits.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Start a new VM from a snapshot: writes VM NEW_VM with
    /// spec.restoreFrom.snapshot = SNAPSHOT.
    Restore {
        snapshot: String,
        new_vm: String,
        /// Create it Paused instead of Running.
        #[arg(long)]
        paused: bool,
        /// Return only once the VM is Running (or Paused, with --paused).
        #[arg(long)]
        wait: bool,
        /// Seconds --wait waits.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Set how many VMs a pool keeps.
    Scale {
        /// `vmpool`.
        kind: String,
        name: String,
        #[arg(long)]
        replicas: u32,
    },
    /// A pool's rollouts: status, history, pause, resume and undo.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Manage contexts in the config file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Images: import a root filesystem or a kernel.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Create, list, revoke and rotate API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Show the audit log: every change and every refusal, with who and when.
    Audit {
        /// Only records about this kind (vm, template, ...).
        kind: Option<String>,
        /// Only records about this object.
        name: Option<String>,
        /// Only records of this actor (user:alice).
        #[arg(long)]
        actor: Option<String>,
        /// Only allowed, denied or failed requests.
        #[arg(long, value_parser = ["allowed", "denied", "failed"])]
        result: Option<String>,
        /// Only records since this time (RFC 3339) or this long ago (1h).
        #[arg(long)]
        since: Option<String>,
        /// Across all projects (cluster admins).
        #[arg(short = 'A', long)]
        all_projects: bool,
        /// table, json, yaml or csv.
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json", "yaml", "csv"])]
        output: String,
    },
    /// Show who the token stands for and its roles.
    Whoami,
    /// Print a shell completion script.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print a VM's guest console (or with --vmm, its Firecracker log).
    Logs {
        /// `vm`.
        kind: String,
        name: String,
        /// Keep printing as the log grows, until the VM is deleted.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only the last N lines (default 100).
        #[arg(long)]
        tail: Option<usize>,
        /// The VMM's own log instead of the guest console.
        #[arg(long)]
        vmm: bool,
        /// Only lines of the last 30s, 5m, 2h (the VMM's log only).
        #[arg(long, requires = "vmm")]
        since: Option<String>,
    },
    /// Show CPU, memory and I/O of VMs or nodes.
    #[command(subcommand)]
    Top(TopCommand),
    /// Print the client and server versions.
    Version,
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// Show the rollout and follow it until it completes (exit 0), halts
    /// or rolls back (exit 1).
    Status {
        /// `vmpool`.
        kind: String,
        name: String,
        /// Follow the rollout (`--watch=false`: print it once).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        watch: bool,
        /// Seconds to follow it before giving up (exit 1).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// List the pool's revisions and what changed in each.
    History {
        /// `vmpool`.
        kind: String,
        name: String,
        /// Print this revision's VM template.
        #[arg(long)]
        revision: Option<u64>,
    },
    /// Stop the rollout where it is (spec.paused).
    Pause {
        /// `vmpool`.
        kind: String,
        name: String,
    },
    /// Let a paused rollout go on.
    Resume {
        /// `vmpool`.
        kind: String,
        name: String,
    },
    /// Go back to an earlier revision's template (default: the previous one).
    Undo {
        /// `vmpool`.
        kind: String,
        name: String,
        #[arg(long)]
        to_revision: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
enum TopCommand {
    /// Each VM's CPU, memory, disk and network use.
    #[command(alias = "vm")]
    Vms {
        /// Across all projects.
        #[arg(short = 'A', long)]
        all_projects: bool,
    },
    /// Each node's CPU and memory, and its VMs' share.
    #[command(alias = "node")]
    Nodes,
}

#[derive(Debug, clap::Args)]
struct PowerArgs {
    /// `vm`.
    kind: String,
    names: Vec<String>,
    /// Act on every VM matching this label selector.
    #[arg(short = 'l', long)]
    selector: Option<String>,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Issue a token (shown once): for yourself, a service account of a
    /// project you administer (sa:PROJECT:NAME), or, as a cluster admin,
    /// anyone (user:NAME, system:controller, system:join).
    Create {
        /// Who the token stands for; default: you.
        #[arg(long)]
        subject: Option<String>,
        /// What it is for.
        #[arg(long, default_value = "")]
        description: String,
        /// Lifetime, such as 12h or 30d; default: until revoked (join tokens: 1h).
        #[arg(long)]
        ttl: Option<String>,
        /// `token` prints only the token (for scripts), `json` everything.
        #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "token", "json"])]
        output: String,
    },
    /// List the tokens you may see (never their secrets).
    List {
        #[arg(long)]
        subject: Option<String>,
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json", "yaml"])]
        output: String,
    },
    /// Revoke a token: it stops working within a second, on every apiserver.
    Revoke { id: String },
    /// Replace a token: the new one is shown once; the old one works for the grace period.
    Rotate {
        id: String,
        /// How long the old token keeps working (default 5m).
        #[arg(long)]
        grace: Option<String>,
        #[arg(short = 'o', long, default_value = "text", value_parser = ["text", "token", "json"])]
        output: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// List the contexts.
    GetContexts,
    /// Print the current context's name.
    CurrentContext,
    /// Make a context the current one.
    UseContext { name: String },
    /// Create or update a context from --server, --certificate-authority,
    /// --token and --project.
    SetContext { name: String },
}

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
    Ok(Selection { kind: Some(&a.kind), names: &a.names, files: &[], labels: a.selector.as_deref() })
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
        Command::Apply { files, dry_run, prune, selector } => {
            let prune = if *prune { selector.as_deref() } else { None };
            apply::apply(&ctx, files, dry_run.as_deref() == Some("server"), prune).await
        }
        Command::Get { kind, names, output, selector, field_selector, all_projects, watch } => {
            let o = GetOptions {
                output: output.as_deref(),
                labels: selector.as_deref(),
                fields: field_selector.as_deref(),
                all_projects: *all_projects,
                watch: *watch,
            };
            commands::get(&ctx, kind, names, &o).await
        }
        Command::Describe { kind, name } => commands::describe(&ctx, kind, name).await,
        Command::Delete { kind, names, files, selector, wait, timeout } => {
            let sel = Selection { kind: kind.as_deref(), names, files, labels: selector.as_deref() };
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
        Command::Start(a) => commands::power(&ctx, "Running", "started", &power_selection(a)?).await,
        Command::Stop(a) => commands::power(&ctx, "Stopped", "stopped", &power_selection(a)?).await,
        Command::Pause(a) => commands::power(&ctx, "Paused", "paused", &power_selection(a)?).await,
        Command::Resume(a) => commands::power(&ctx, "Running", "resumed", &power_selection(a)?).await,
        Command::Snapshot { vm, name, stay_paused, wait, timeout } => {
            let wait = wait.then(|| Duration::from_secs(*timeout));
            commands::snapshot(&ctx, vm, name, *stay_paused, wait).await
        }
        Command::Restore { snapshot, new_vm, paused, wait, timeout } => {
            let wait = wait.then(|| Duration::from_secs(*timeout));
            commands::restore(&ctx, snapshot, new_vm, *paused, wait).await
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
        Command::Top(TopCommand::Vms { all_projects }) => observe::top_vms(&ctx, *all_projects).await,
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
