//! The `init` command: put the credential addresses on a link of their own, through netlink.
//!
//! Contract, idempotent (run twice, same state, exit 0):
//! 1. link `pod-id-link0` exists, of kind `dummy`; on kernels without `dummy` (RTM_NEWLINK
//!    answers an error) another kind that holds local addresses (`ifb`) is used, with a warning;
//!    `--link-kind` forces one. An existing link of that name is reused whatever its kind;
//! 2. the link is up;
//! 3. `169.254.170.23/32` and `fd00:ec2::23/128` (no duplicate address detection) are on it;
//! 4. host routes to both go through it. A route to either address through *another* link is an
//!    error naming both links: the node would send pods' credential requests elsewhere.
//!
//! IPv6 is optional: if the node has no IPv6 (the address cannot be added), IPv4 setup still
//! succeeds and the report says IPv6 was skipped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What to set up.
#[derive(Debug, Clone)]
pub struct InitSettings {
    pub link_name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
    /// `None`: `dummy`, falling back to `ifb`.
    pub link_kind: Option<String>,
}

/// What `init` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    pub link_index: u32,
    pub link_kind: String,
    pub created: bool,
    pub ipv6: Ipv6State,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ipv6State {
    Configured,
    Disabled,
    /// The node has no IPv6 (or refused the address): why.
    Skipped(String),
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("cannot create link {name}: kinds tried {tried:?} all failed ({last})")]
    CreateLink {
        name: String,
        tried: Vec<String>,
        last: String,
    },
    #[error("{addr} is routed through link {other}, not {ours}; remove that route or pick other addresses")]
    RouteConflict {
        addr: IpAddr,
        other: String,
        ours: String,
    },
    #[error("link setup is supported on Linux only")]
    Unsupported,
}

#[cfg(target_os = "linux")]
pub use linux::init;

#[cfg(not(target_os = "linux"))]
pub async fn init(_settings: &InitSettings) -> Result<InitReport, InitError> {
    Err(InitError::Unsupported)
}

#[cfg(target_os = "linux")]
mod linux {
    use super::*;
    use futures_util::stream::TryStreamExt;
    use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
    use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
    use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

    const EEXIST: i32 = 17;

    fn errno(e: &rtnetlink::Error) -> Option<i32> {
        match e {
            rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
            _ => None,
        }
    }

    fn nl(e: rtnetlink::Error) -> InitError {
        InitError::Netlink(e.to_string())
    }

    fn kind_of(name: &str) -> InfoKind {
        match name {
            "dummy" => InfoKind::Dummy,
            "ifb" => InfoKind::Ifb,
            "bridge" => InfoKind::Bridge,
            other => InfoKind::Other(other.to_owned()),
        }
    }

    async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<(u32, String)>, InitError> {
        let mut links = handle.link().get().match_name(name.to_owned()).execute();
        match links.try_next().await {
            Ok(Some(msg)) => {
                let kind = msg
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                            LinkInfo::Kind(k) => Some(k.to_string()),
                            _ => None,
                        }),
                        _ => None,
                    })
                    .unwrap_or_else(|| "unknown".into());
                Ok(Some((msg.header.index, kind)))
            }
            Ok(None) => Ok(None),
            // ENODEV: no such link.
            Err(e) if errno(&e) == Some(19) => Ok(None),
            Err(e) => Err(nl(e)),
        }
    }

    async fn link_name(handle: &Handle, index: u32) -> String {
        let mut links = handle.link().get().match_index(index).execute();
        if let Ok(Some(msg)) = links.try_next().await {
            if let Some(name) = msg.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            }) {
                return name;
            }
        }
        format!("#{index}")
    }

    async fn ensure_link(
        handle: &Handle,
        s: &InitSettings,
    ) -> Result<(u32, String, bool), InitError> {
        if let Some((index, kind)) = link_by_name(handle, &s.link_name).await? {
            return Ok((index, kind, false));
        }
        let kinds: Vec<String> = match &s.link_kind {
            Some(k) => vec![k.clone()],
            None => vec!["dummy".into(), "ifb".into()],
        };
        let mut last = String::new();
        for (i, kind) in kinds.iter().enumerate() {
            let msg = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(kind_of(kind))
                .name(s.link_name.clone())
                .build();
            match handle.link().add(msg).execute().await {
                Ok(()) => {
                    if i > 0 {
                        tracing::warn!(link = %s.link_name, kind = %kind, failed = %kinds[..i].join(","),
                            "this kernel cannot create the preferred link kind; using a fallback");
                    }
                    let (index, kind) = link_by_name(handle, &s.link_name)
                        .await?
                        .ok_or_else(|| InitError::Netlink("link vanished after creation".into()))?;
                    return Ok((index, kind, true));
                }
                Err(e) if errno(&e) == Some(EEXIST) => {
                    if let Some((index, kind)) = link_by_name(handle, &s.link_name).await? {
                        return Ok((index, kind, false));
                    }
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(InitError::CreateLink {
            name: s.link_name.clone(),
            tried: kinds,
            last,
        })
    }

    async fn add_address(handle: &Handle, index: u32, ip: IpAddr) -> Result<(), rtnetlink::Error> {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        let mut req = handle.address().add(index, ip, prefix);
        if ip.is_ipv6() {
            // No DAD: the address is ours alone and must be usable at once (binding fails while
            // it is tentative).
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        match req.execute().await {
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            other => other,
        }
    }

    /// The main-table host route to `ip`, as (output link index), if any.
    async fn host_route(handle: &Handle, ip: IpAddr) -> Result<Option<u32>, InitError> {
        let query = match ip {
            IpAddr::V4(_) => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            IpAddr::V6(_) => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        };
        let full = if ip.is_ipv4() { 32 } else { 128 };
        let mut routes = handle.route().get(query).execute();
        while let Some(r) = routes.try_next().await.map_err(nl)? {
            if r.header.destination_prefix_length != full || r.header.table != 254 {
                continue;
            }
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
                RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
                _ => None,
            });
            if dst == Some(ip) {
                let oif = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                });
                return Ok(Some(oif.unwrap_or(0)));
            }
        }
        Ok(None)
    }

    async fn ensure_route(
        handle: &Handle,
        index: u32,
        ip: IpAddr,
        ours: &str,
    ) -> Result<(), InitError> {
        match host_route(handle, ip).await? {
            Some(oif) if oif == index => return Ok(()),
            Some(oif) => {
                return Err(InitError::RouteConflict {
                    addr: ip,
                    other: link_name(handle, oif).await,
                    ours: ours.to_owned(),
                })
            }
            None => {}
        }
        let msg = match ip {
            IpAddr::V4(v4) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(v4, 32)
                .output_interface(index)
                .build(),
            IpAddr::V6(v6) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(v6, 128)
                .output_interface(index)
                .build(),
        };
        match handle.route().add(msg).execute().await {
            Err(e) if errno(&e) == Some(EEXIST) => Ok(()),
            other => other.map_err(nl),
        }
    }

    pub async fn init(s: &InitSettings) -> Result<InitReport, InitError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| InitError::Netlink(e.to_string()))?;
        let conn_task = tokio::spawn(conn);
        let result = run(&handle, s).await;
        conn_task.abort();
        result
    }

    async fn run(handle: &Handle, s: &InitSettings) -> Result<InitReport, InitError> {
        let (index, kind, created) = ensure_link(handle, s).await?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl)?;
        add_address(handle, index, IpAddr::V4(s.ipv4))
            .await
            .map_err(nl)?;
        ensure_route(handle, index, IpAddr::V4(s.ipv4), &s.link_name).await?;
        let ipv6 = match s.ipv6 {
            None => Ipv6State::Disabled,
            Some(v6) => match add_address(handle, index, IpAddr::V6(v6)).await {
                Ok(()) => {
                    ensure_route(handle, index, IpAddr::V6(v6), &s.link_name).await?;
                    Ipv6State::Configured
                }
                Err(e) => Ipv6State::Skipped(e.to_string()),
            },
        };
        Ok(InitReport {
            link_index: index,
            link_kind: kind,
            created,
            ipv6,
        })
    }
}
