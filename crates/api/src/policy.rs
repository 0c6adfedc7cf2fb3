//! What each kind allows: who reads it, who writes it, what the system's
//! own components may do with it, and whether quotas count it. A kind
//! states its policy beside its type ([`ResourceSpec::POLICY`]); RBAC
//! ([`crate::rbac::decide`]), quota admission, the store and the web
//! console read it from the registry, so no other code lists kinds to
//! decide these things.
//!
//! [`ResourceSpec::POLICY`]: crate::meta::ResourceSpec::POLICY

use crate::rbac::Role;

/// Who reads objects of a kind (get, list, watch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readers {
    /// Holders of this role (or a stronger one) in the object's project.
    Project(Role),
    /// Every authenticated person and service account.
    Everyone,
    /// Every authenticated person and service account, each seeing the
    /// objects about projects it may read (a cluster-wide kind such as
    /// Events, whose objects are about objects in projects).
    EveryoneInTheirProjects,
    /// Holders of any cluster-wide role.
    ClusterRoles,
    /// Cluster admins only.
    ClusterAdmins,
}

/// Who creates, updates and deletes objects of a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writers {
    /// Holders of this role (or a stronger one) in the object's project.
    Project(Role),
    /// Cluster admins (and the components the policy names).
    ClusterAdmins,
    /// The system's components only (and cluster admins).
    System,
}

/// What a node agent may do with objects of a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAccess {
    /// Nothing.
    None,
    /// Read one object by name (an Image whose file it downloads).
    Get,
    /// Read every object, create its own and write its own status (its
    /// Node). Whether a create names the node itself is checked when the
    /// object is admitted, as the name is in the body.
    Own,
}

/// How quota admission uses a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaUse {
    /// Quotas neither count it nor read it.
    None,
    /// Its objects count against a project's quotas: creating one or
    /// changing its spec is admitted only within them.
    Counted,
    /// Read to work out what counted objects use (a Template that
    /// supplies a VM's size), not counted itself.
    Input,
}

/// Everything the system decides about a kind from its kind alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub read: Readers,
    pub write: Writers,
    /// The controller creates, updates and deletes objects of this kind.
    /// (It reads every kind and writes every status regardless.)
    pub controller_writes: bool,
    pub node: NodeAccess,
    pub quota: QuotaUse,
}

impl Policy {
    /// A project-scoped kind that viewers read and holders of `writer` write.
    pub const fn project(writer: Role) -> Policy {
        Policy {
            read: Readers::Project(Role::Viewer),
            write: Writers::Project(writer),
            controller_writes: false,
            node: NodeAccess::None,
            quota: QuotaUse::None,
        }
    }

    /// This policy, with the controller writing the kind too.
    pub const fn written_by_the_controller(mut self) -> Policy {
        self.controller_writes = true;
        self
    }

    /// This policy, with quotas using the kind as `quota` says.
    pub const fn quota(mut self, quota: QuotaUse) -> Policy {
        self.quota = quota;
        self
    }

    /// This policy, with nodes allowed `node`.
    pub const fn nodes(mut self, node: NodeAccess) -> Policy {
        self.node = node;
        self
    }

    /// This policy, written by `write`.
    pub const fn written_by(mut self, write: Writers) -> Policy {
        self.write = write;
        self
    }

    /// This policy, read by `read`.
    pub const fn read_by(mut self, read: Readers) -> Policy {
        self.read = read;
        self
    }

    /// A cluster-wide kind, read by `read`, written by `write`.
    pub const fn cluster(read: Readers, write: Writers) -> Policy {
        Policy { read, write, controller_writes: false, node: NodeAccess::None, quota: QuotaUse::None }
    }
}
