//! nexus resource types and their validation.
//!
//! This crate does no I/O: it is what the apiserver stores, what the
//! controller reconciles and what `nexusctl` prints, shared by all of them.
//! The HTTP clients that carry these types are in `nexus-client`.

pub mod agent;
pub mod auth;
pub mod binding;
pub mod conditions;
pub mod error;
pub mod event;
pub mod fnv;
pub mod fork;
pub mod guest;
pub mod image;
pub mod lease;
pub mod meta;
pub mod node;
pub mod policy;
pub mod pool;
pub mod quota;
pub mod rbac;
pub mod registry;
pub mod schema;
pub mod shape;
pub mod snapshot;
pub mod storage;
pub mod template;
pub mod validation;
pub mod vm;
pub mod volume;
pub mod watch;

pub use binding::{ClusterRoleBinding, ClusterRoleBindingSpec, RoleBinding, RoleBindingSpec};
pub use error::ErrorBody;
pub use event::{Event, EventSpec};
pub use image::{Image, ImageSpec};
pub use lease::{Lease, LeaseSpec};
pub use meta::{Condition, ConditionStatus, ListMeta, Object, ObjectList, ObjectMeta, ResourceSpec};
pub use node::{Node, NodeSpec, NodeStatus};
pub use pool::{VmPool, VmPoolSpec};
pub use quota::{ResourceQuota, ResourceQuotaSpec};
pub use snapshot::{Snapshot, SnapshotSpec};
pub use template::{Template, TemplateSpec};
pub use vm::{PowerState, Vm, VmPhase, VmSpec, VmStatus};
pub use volume::{Volume, VolumeSpec};
pub use watch::{WatchEvent, WatchEventType};

/// The `apiVersion` of every nexus object.
pub const API_VERSION: &str = "nexus/v1";

/// The apiserver's routes that are not about one kind, with what they do.
pub const OPERATIONS_ROUTES: &[(&str, &str)] = &[
    ("/healthz", "GET: liveness"),
    ("/readyz", "GET: readiness (storage reachable and a node Ready, unless --ready-without-nodes)"),
    ("/version", "GET: server version"),
    ("/metrics", "GET: Prometheus metrics"),
    ("/openapi.json", "GET: OpenAPI 3.1, generated from the types and the served kinds"),
    ("/ui/", "GET: the web console (its files need no token; it signs in with one)"),
    ("/v1/whoami", "GET: the caller's subject and roles"),
    ("/v1/kinds", "GET: the kinds served, with their paths, aliases and field selectors (discovery)"),
    ("/v1/tokens", "GET: list tokens; POST: create one (the secret is shown once)"),
    ("/v1/tokens/{id}", "GET: one token; DELETE: revoke it"),
    ("/v1/tokens/{id}/rotate", "POST: a successor token; the old one works for a grace period"),
    ("/v1/nodes/{name}/join", "POST (join token): register a node and get its credential"),
    (
        "/v1/projects/{project}/vms/{name}/log",
        "GET (who may read the VM): its console (source=console) or Firecracker log (source=vmm), \
         tail=N, follow=true (chunked text/plain until the VM is deleted), since=5m (vmm only)",
    ),
    (
        "/v1/projects/{project}/vms/{name}/fork",
        "POST (who may create VMs and Snapshots): {\"copies\": N}; one Snapshot of the running VM and N VMs \
         restored from it, labelled nexus.dev/fork=ID (a ForkResult)",
    ),
    (
        "/v1/events:record",
        "POST (who may create and update Events): {\"items\": [Event, ...]}, 1 to 100; each created, or folded \
         into the Event of its name (an EventRecordResult)",
    ),
    ("/v1/projects/{project}/vms/{name}/metrics", "GET (who may read the VM): its recent metrics, from its node"),
    ("/v1/nodes/{name}/metrics", "GET (who may read the node): the host's CPU and memory and its VMs' metrics"),
    ("/v1/nodes/{name}/credential", "GET (controller): the node agent's API credential; PUT (the node): set it"),
    ("/v1/audit", "GET: audit records (project, kind, name, actor, since, until, result, limit, continue)"),
];

/// Project used when a command or request names none.
pub const DEFAULT_PROJECT: &str = "default";
