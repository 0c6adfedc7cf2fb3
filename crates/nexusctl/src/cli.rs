//! The command line: every command, subcommand and flag, as clap parses them.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "nexusctl", version, about = "Manage nexus microVMs declaratively", propagate_version = true)]
pub(crate) struct Cli {
    /// URL of the apiserver, or several separated by commas (default: the
    /// context's, else https://127.0.0.1:7443).
    #[arg(long, global = true, env = "NEXUS_SERVER")]
    pub(crate) server: Option<String>,
    /// CA certificate (PEM) the apiserver's certificate is checked against
    /// (default: the context's, else the system's roots).
    #[arg(long, global = true, env = "NEXUS_CA_FILE")]
    pub(crate) certificate_authority: Option<std::path::PathBuf>,
    /// Bearer token for the apiserver.
    #[arg(long, global = true, env = "NEXUS_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// Project to work in (default: the context's, else `default`).
    #[arg(long, short = 'p', global = true, env = "NEXUS_PROJECT")]
    pub(crate) project: Option<String>,
    /// Context from the config file to use instead of the current one.
    #[arg(long, global = true, env = "NEXUS_CONTEXT")]
    pub(crate) context: Option<String>,
    /// Id sent as X-Request-Id with every request of this command (default:
    /// a fresh one): the apiserver, the controller and the node agents log
    /// their work on the request under it.
    #[arg(long, global = true)]
    pub(crate) request_id: Option<String>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ImageCommand {
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
pub(crate) enum Command {
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
        /// name, json or yaml: the applied objects (as stored) instead of
        /// a line each.
        #[arg(short = 'o', long)]
        output: Option<String>,
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
        /// Every object of the kind (in the project, for a kind that has one).
        #[arg(long)]
        all: bool,
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
    /// N running copies of a running VM in one request: one snapshot of
    /// it (paused only while it is written) and N VMs restored from it,
    /// labelled nexus.dev/fork=ID.
    Fork {
        vm: String,
        /// How many copies (1 to 100).
        #[arg(long, default_value_t = 1)]
        copies: u32,
        /// Return only once every copy is Running.
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
pub(crate) enum RolloutCommand {
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
pub(crate) enum TopCommand {
    /// Each VM's CPU, memory, disk and network use.
    #[command(alias = "vm")]
    Vms {
        /// Across all projects.
        #[arg(short = 'A', long)]
        all_projects: bool,
        /// Each drive of each VM (bytes and operations read and written,
        /// requests its rate limiter delayed), since its VMM started.
        #[arg(long)]
        drives: bool,
    },
    /// Each node's CPU and memory, and its VMs' share.
    #[command(alias = "node")]
    Nodes,
}

#[derive(Debug, clap::Args)]
pub(crate) struct PowerArgs {
    /// `vm`.
    pub(crate) kind: String,
    pub(crate) names: Vec<String>,
    /// Act on every VM matching this label selector.
    #[arg(short = 'l', long)]
    pub(crate) selector: Option<String>,
    /// Return only once each VM is in the new state (or has failed).
    #[arg(long)]
    pub(crate) wait: bool,
    /// Seconds --wait waits.
    #[arg(long, default_value_t = 120)]
    pub(crate) timeout: u64,
}

impl PowerArgs {
    /// How long to wait for the new state, when asked to.
    pub(crate) fn wait(&self) -> Option<std::time::Duration> {
        self.wait.then(|| std::time::Duration::from_secs(self.timeout))
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
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
pub(crate) enum ConfigCommand {
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
