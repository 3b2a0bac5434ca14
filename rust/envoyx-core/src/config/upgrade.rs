//! `upgrade_configs` of the connection manager and of a route (WebSocket and other
//! HTTP/1.1 upgrades, and `CONNECT`), mapped onto the model. What they decide at
//! run time is in `http/upgrade.rs`.

use super::reader::Obj;
use super::type_urls::ROUTER_TYPE;

/// The connection manager's `upgrade_configs`: the upgrade types it allows (or
/// lists as disabled), by lower-cased `upgrade_type` (`CONNECT` is `connect`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HcmUpgrades(pub Vec<(String, bool)>);

/// A route's `upgrade_configs` (`RouteAction.UpgradeConfig`): per upgrade type,
/// whether the route allows it (over the connection manager's choice), and for
/// `CONNECT` whether the route terminates it (`connect_config`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteUpgrades {
    pub types: Vec<(String, bool)>,
    /// `connect_config` of the `CONNECT` entry: the route answers CONNECT itself
    /// (200) and tunnels the stream's bytes over TCP to the cluster's host.
    pub terminate_connect: bool,
}

/// `upgrade_configs` of the connection manager. `filters` (a filter chain of its
/// own for upgrades) is accepted only when it is the router alone and the
/// connection manager's chain has no other filter, where it changes nothing.
pub fn map_hcm_upgrades(hcm: &Obj<'_>) -> HcmUpgrades {
    let has_own_filters = hcm
        .raw("http_filters")
        .and_then(|v| v.as_array())
        .is_some_and(|list| list.len() > 1);
    let mut out = Vec::new();
    for u in hcm.list("upgrade_configs") {
        let Some(kind) = u.str("upgrade_type") else {
            u.error("upgrade_type", "is required");
            continue;
        };
        let filters = u.list("filters");
        // The router's own fields, if any are set, are refused by its reader.
        let routers = filters
            .iter()
            .filter(|f| {
                f.str("name");
                f.obj("typed_config")
                    .is_some_and(|tc| tc.any_type() == Some(ROUTER_TYPE))
            })
            .count();
        if !filters.is_empty() && (routers != 1 || filters.len() != 1 || has_own_filters) {
            u.error(
                "filters",
                "not supported by envoyx (an upgrade filter chain other than the router alone)",
            );
        }
        out.push((kind.to_ascii_lowercase(), u.bool("enabled").unwrap_or(true)));
    }
    HcmUpgrades(out)
}

/// `route.upgrade_configs`.
pub fn map_route_upgrades(route: &Obj<'_>) -> Option<Box<RouteUpgrades>> {
    let list = route.list("upgrade_configs");
    if list.is_empty() {
        return None;
    }
    let mut out = RouteUpgrades::default();
    for u in list {
        let Some(kind) = u.str("upgrade_type") else {
            u.error("upgrade_type", "is required");
            continue;
        };
        let kind = kind.to_ascii_lowercase();
        if let Some(cc) = u.obj("connect_config") {
            if kind != "connect" {
                u.error(
                    "connect_config",
                    format!("Non-CONNECT upgrade type {kind} has ConnectConfig"),
                );
            }
            // `allow_post: false` is the default; true (and `proxy_protocol_config`)
            // are left unread, so refused by name.
            if cc.bool("allow_post") == Some(true) {
                cc.error("allow_post", "not supported by envoyx");
            }
            out.terminate_connect = true;
        }
        out.types.push((kind, u.bool("enabled").unwrap_or(true)));
    }
    Some(Box::new(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::reader::Errors;
    use serde_json::{Value, json};

    fn route(v: Value) -> (Option<Box<RouteUpgrades>>, Vec<String>) {
        let errors = Errors::default();
        let out = {
            let obj = Obj::new(&v, "route".into(), &errors).unwrap();
            map_route_upgrades(&obj)
        };
        (out, errors.into_vec())
    }

    #[test]
    fn route_upgrades_lower_case_and_default_enabled() {
        let (u, errors) = route(json!({"upgrade_configs": [
            {"upgrade_type": "WebSocket"},
            {"upgrade_type": "CONNECT", "enabled": false, "connect_config": {}},
        ]}));
        assert!(errors.is_empty(), "{errors:?}");
        let u = u.unwrap();
        assert_eq!(
            u.types,
            vec![("websocket".into(), true), ("connect".into(), false)]
        );
        assert!(u.terminate_connect);
    }

    #[test]
    fn connect_config_errors_name_the_field() {
        let (_, errors) = route(json!({"upgrade_configs": [
            {"upgrade_type": "websocket", "connect_config": {}},
            {"upgrade_type": "CONNECT", "connect_config": {"allow_post": true,
                "proxy_protocol_config": {"version": "V1"}}},
        ]}));
        assert!(
            errors.iter().any(|e| e.contains(
                "route.upgrade_configs[0].connect_config: Non-CONNECT upgrade type websocket"
            )),
            "{errors:?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.ends_with("connect_config.allow_post: not supported by envoyx")),
            "{errors:?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains("connect_config.proxy_protocol_config")),
            "{errors:?}"
        );
    }
}
