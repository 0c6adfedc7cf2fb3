//! systemd transient scopes for VMMs: where systemd runs the host, each VMM
//! is moved into `fc-<uid>.scope` (as `systemd-run --scope` does), so it is
//! accounted, limited and listed by systemd and survives the agent.

use zbus::{OwnedVariant, Variant};
use zbus_systemd::systemd1::ManagerProxy;

use crate::paths::Uid;

/// Failures talking to systemd.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    #[error("connecting to the D-Bus system bus failed")]
    Connect(#[source] zbus::Error),
    #[error("systemd refused {call} for {unit}")]
    Call {
        call: &'static str,
        unit: String,
        #[source]
        source: zbus::Error,
    },
}

/// Whether systemd is the init system (sd_booted's test).
pub fn systemd_is_init() -> bool {
    std::path::Path::new("/run/systemd/system").is_dir()
}

/// The scope unit of VM `uid`.
pub fn unit_name(uid: &Uid) -> String {
    format!("fc-{uid}.scope")
}

/// A connection to systemd's manager.
#[derive(Debug, Clone)]
pub struct Scopes {
    conn: zbus::Connection,
}

impl Scopes {
    /// Connects to the system bus, or to `address` (a D-Bus address) when given.
    pub async fn connect(address: Option<&str>) -> Result<Scopes, ScopeError> {
        let conn = match address {
            Some(a) => zbus::connection::Builder::address(a).build().await.map_err(ScopeError::Connect)?,
            None => zbus::Connection::system().await.map_err(ScopeError::Connect)?,
        };
        Ok(Scopes { conn })
    }

    async fn manager(&self) -> Result<ManagerProxy<'_>, ScopeError> {
        ManagerProxy::new(&self.conn).await.map_err(|source| ScopeError::Call {
            call: "Manager",
            unit: String::new(),
            source,
        })
    }

    /// Moves process `pid` into a new transient scope for VM `uid`.
    pub async fn adopt(&self, uid: &Uid, pid: u32, description: &str) -> Result<(), ScopeError> {
        let unit = unit_name(uid);
        let err = |source| ScopeError::Call { call: "StartTransientUnit", unit: unit.clone(), source };
        let props: Vec<(String, OwnedVariant)> = vec![
            ("PIDs".into(), OwnedVariant::try_from(Variant::from(vec![pid])).map_err(err)?),
            ("Description".into(), OwnedVariant::try_from(Variant::from(description.to_string())).map_err(err)?),
            (
                "CollectMode".into(),
                OwnedVariant::try_from(Variant::from("inactive-or-failed".to_string())).map_err(err)?,
            ),
        ];
        self.manager()
            .await?
            .start_transient_unit(unit.clone(), "fail".into(), props, Vec::new())
            .await
            .map_err(err)?;
        Ok(())
    }

    /// Stops VM `uid`'s scope (and so its processes); a missing unit is fine.
    pub async fn stop(&self, uid: &Uid) -> Result<(), ScopeError> {
        let unit = unit_name(uid);
        match self.manager().await?.stop_unit(unit.clone(), "fail".into()).await {
            Ok(_) => Ok(()),
            Err(zbus::Error::MethodError(name, _, _)) if name.as_str().ends_with("NoSuchUnit") => Ok(()),
            Err(source) => Err(ScopeError::Call { call: "StopUnit", unit, source }),
        }
    }
}
