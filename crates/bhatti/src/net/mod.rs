//! Guest networking: one bridge (the guests' gateway) and one TAP per VM
//! attached to it, optionally inside a named network namespace.
//!
//! Links are managed with iproute2 (`ip -n <ns> …`) rather than rtnetlink
//! plus `TUNSETIFF` ioctls: the kernel refuses TAP creation over netlink,
//! and creating a TAP inside another namespace with ioctls means `setns` on
//! a dedicated thread; `ip -n <ns> tuntap add` does exactly that for us,
//! with clear error messages, and each call costs a few milliseconds next
//! to a VM boot. Setup is idempotent: the bridge is created only when
//! missing and left in place when the engine stops.

mod addr;

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::cmd::{run, CmdError};
pub use addr::{fnv1a64, mac_for, tap_name, IpPool, Subnet};

/// Network settings of the engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSettings {
    /// Bridge name, e.g. `bhatti0`.
    pub bridge: String,
    /// The bridge's address with prefix, e.g. `10.77.0.1/24`; guests get
    /// the other addresses of the subnet.
    pub subnet: String,
    /// Network namespace (a name under `/run/netns`) holding the bridge,
    /// the TAPs and the VMM processes; created when missing.
    #[serde(default)]
    pub netns: Option<String>,
}

impl Default for NetSettings {
    fn default() -> Self {
        NetSettings {
            bridge: "bhatti0".into(),
            subnet: "10.77.0.1/24".into(),
            netns: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid network settings: {0}")]
    Config(String),
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error("no free guest address left in {0}")]
    Exhausted(String),
}

pub type Result<T> = std::result::Result<T, NetError>;

/// A sandbox's network identity, persisted with the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNet {
    pub tap: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
}

/// The bridge, the address pool and TAP management.
#[derive(Debug)]
pub struct Network {
    settings: NetSettings,
    subnet: Subnet,
    pool: Mutex<IpPool>,
}

impl Network {
    /// Validates the settings and makes sure the namespace and the bridge
    /// (with its address, up) exist.
    pub async fn setup(settings: NetSettings) -> Result<Network> {
        let subnet = Subnet::parse(&settings.subnet).map_err(NetError::Config)?;
        if settings.bridge.is_empty() || settings.bridge.len() > 15 {
            return Err(NetError::Config(format!(
                "bridge name {:?} must be 1 to 15 characters",
                settings.bridge
            )));
        }
        let net = Network {
            pool: Mutex::new(IpPool::new(subnet)),
            settings,
            subnet,
        };
        if let Some(ns) = &net.settings.netns {
            if !Path::new("/run/netns").join(ns).exists() {
                run("ip", ["netns", "add", ns]).await?;
                net.ip(&["link", "set", "lo", "up"]).await?;
            }
        }
        let bridge = net.settings.bridge.clone();
        if !net.link_exists(&bridge).await {
            net.ip(&["link", "add", "name", &bridge, "type", "bridge"])
                .await?;
        }
        net.ip(&["addr", "replace", &subnet.cidr(), "dev", &bridge])
            .await?;
        net.ip(&["link", "set", &bridge, "up"]).await?;
        tracing::info!(bridge = %bridge, subnet = %subnet.cidr(), netns = ?net.settings.netns, "guest network ready");
        Ok(net)
    }

    pub fn settings(&self) -> &NetSettings {
        &self.settings
    }

    pub fn netns(&self) -> Option<&str> {
        self.settings.netns.as_deref()
    }

    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    /// Picks the network identity of a new sandbox.
    pub fn allocate(&self, id: &str) -> Result<GuestNet> {
        let ip = self
            .pool
            .lock()
            .expect("pool lock")
            .allocate()
            .ok_or_else(|| NetError::Exhausted(self.subnet.cidr()))?;
        Ok(GuestNet {
            tap: tap_name(id),
            mac: mac_for(id),
            ip,
            gateway: self.subnet.gateway,
            prefix: self.subnet.prefix,
        })
    }

    /// Marks a recovered sandbox's address as taken; false if it does not
    /// fit this subnet or is already taken.
    pub fn reserve(&self, net: &GuestNet) -> bool {
        self.pool.lock().expect("pool lock").reserve(net.ip)
    }

    pub fn release(&self, net: &GuestNet) {
        self.pool.lock().expect("pool lock").release(net.ip)
    }

    /// Makes sure the TAP exists, is attached to the bridge and is up.
    pub async fn ensure_tap(&self, tap: &str) -> Result<()> {
        if !self.link_exists(tap).await {
            self.ip(&["tuntap", "add", "dev", tap, "mode", "tap"])
                .await?;
        }
        self.ip(&["link", "set", tap, "master", &self.settings.bridge])
            .await?;
        self.ip(&["link", "set", tap, "up"]).await?;
        Ok(())
    }

    /// Deletes the TAP; a missing one is fine.
    pub async fn remove_tap(&self, tap: &str) -> Result<()> {
        if !self.link_exists(tap).await {
            return Ok(());
        }
        match self.ip(&["link", "del", "dev", tap]).await {
            Ok(_) => Ok(()),
            Err(_) if !self.link_exists(tap).await => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn link_exists(&self, name: &str) -> bool {
        self.ip(&["link", "show", "dev", name]).await.is_ok()
    }

    /// `ip [-n <ns>] args…`
    async fn ip(&self, args: &[&str]) -> std::result::Result<String, CmdError> {
        let mut full: Vec<&str> = Vec::with_capacity(args.len() + 2);
        if let Some(ns) = &self.settings.netns {
            full.extend(["-n", ns.as_str()]);
        }
        full.extend_from_slice(args);
        run("ip", full).await
    }
}
