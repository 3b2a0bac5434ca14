"""Bootstrap loading and validation against Envoy's schema (pure Python, nothing served)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2,
)
from google.protobuf import text_format

import envoyx
from envoyx.config import bootstrap_to_json, load_bootstrap

HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"

BOOTSTRAP_YAML = f"""
node: {{id: front, cluster: edge}}
admin:
  address:
    socket_address: {{address: 127.0.0.1, port_value: 0}}
static_resources:
  listeners:
  - name: listener_0
    address:
      socket_address: {{address: 127.0.0.1, port_value: 0}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {HCM}
          stat_prefix: ingress_http
          access_log:
          - name: envoy.access_loggers.stdout
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": {ROUTER}}}
          route_config:
            name: local_route
            virtual_hosts:
            - name: backend
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: backend, timeout: 1.5s}}
  clusters:
  - name: backend
    connect_timeout: 0.25s
    type: STATIC
    lb_policy: ROUND_ROBIN
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: 8080}}
"""

HCM_PATH = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config"


def bootstrap_dict() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(BOOTSTRAP_YAML)
    return document


def hcm(document: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = document["static_resources"]["listeners"][0]["filter_chains"][0][
        "filters"
    ][0]["typed_config"]
    return config


def errors_of(source: Any, **kwargs: Any) -> list[str]:
    with pytest.raises(envoyx.ConfigError) as info:
        load_bootstrap(source, **kwargs)
    return info.value.errors


# -- valid documents and every kind of source ------------------------------------------


def test_valid_bootstrap_from_text() -> None:
    bootstrap = load_bootstrap(BOOTSTRAP_YAML)
    assert isinstance(bootstrap, Bootstrap)
    assert bootstrap.static_resources.clusters[0].name == "backend"
    assert bootstrap.static_resources.clusters[0].connect_timeout.nanos == 250_000_000
    route = bootstrap.static_resources.listeners[0].filter_chains[0].filters[0]
    assert route.typed_config.type_url == HCM


def test_every_source_kind_gives_the_same_message(tmp_path: Path) -> None:
    expected = load_bootstrap(BOOTSTRAP_YAML)
    yaml_file = tmp_path / "bootstrap.yaml"
    yaml_file.write_text(BOOTSTRAP_YAML)
    yml_file = tmp_path / "bootstrap.yml"
    yml_file.write_text(BOOTSTRAP_YAML)
    json_file = tmp_path / "bootstrap.json"
    json_file.write_text(json.dumps(bootstrap_dict()))
    pb_text_file = tmp_path / "bootstrap.pb_text"
    pb_text_file.write_text(text_format.MessageToString(expected))
    pb_file = tmp_path / "bootstrap.pb"
    pb_file.write_bytes(expected.SerializeToString())

    sources: list[Any] = [
        yaml_file,
        str(yaml_file),
        yml_file,
        json_file,
        pb_text_file,
        pb_file,
        bootstrap_dict(),
        json.dumps(bootstrap_dict()),
        expected,
    ]
    for source in sources:
        assert load_bootstrap(source) == expected, source


def test_message_source_is_copied_not_modified() -> None:
    original = load_bootstrap(BOOTSTRAP_YAML)
    loaded = load_bootstrap(original, service_node="other")
    assert loaded.node.id == "other"
    assert original.node.id == "front"


def test_camel_case_field_names_are_accepted() -> None:
    document = {
        "staticResources": {
            "clusters": [{"name": "c", "connectTimeout": "1s", "lbPolicy": "RANDOM"}]
        }
    }
    cluster = load_bootstrap(document).static_resources.clusters[0]
    assert cluster.connect_timeout.seconds == 1
    assert cluster.lb_policy == cluster.RANDOM


def test_enum_names_are_case_insensitive_as_in_envoy() -> None:
    document = bootstrap_dict()
    document["static_resources"]["clusters"][0]["type"] = "static"
    document["static_resources"]["clusters"][0]["lb_policy"] = "least_request"
    cluster = load_bootstrap(document).static_resources.clusters[0]
    assert cluster.lb_policy == cluster.LEAST_REQUEST


def test_wrappers_and_structs_take_plain_json_values() -> None:
    document = bootstrap_dict()
    cluster = document["static_resources"]["clusters"][0]
    cluster["per_connection_buffer_limit_bytes"] = 32768
    cluster["metadata"] = {"filter_metadata": {"envoyx": {"team": "edge", "weight": 1.5}}}
    loaded = load_bootstrap(document).static_resources.clusters[0]
    assert loaded.per_connection_buffer_limit_bytes.value == 32768
    assert loaded.metadata.filter_metadata["envoyx"]["weight"] == 1.5


def test_bootstrap_to_json_is_canonical_proto_json() -> None:
    text = bootstrap_to_json(load_bootstrap(BOOTSTRAP_YAML))
    document = json.loads(text)
    cluster = document["static_resources"]["clusters"][0]
    assert cluster["connect_timeout"] == "0.250s"
    assert "lb_policy" not in cluster  # ROUND_ROBIN is the default, so omitted
    typed_config = document["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    assert typed_config["@type"] == HCM
    assert typed_config["stat_prefix"] == "ingress_http"
    assert "statPrefix" not in text


def test_type_url_outside_the_preloaded_modules_is_imported_on_demand() -> None:
    document = bootstrap_dict()
    hcm(document)["http_filters"].insert(
        0,
        {
            "name": "envoy.filters.http.cors",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"
            },
        },
    )
    load_bootstrap(document)


def test_typed_struct_with_unknown_type_url_is_accepted() -> None:
    document = bootstrap_dict()
    hcm(document)["http_filters"].insert(
        0,
        {
            "name": "envoyx.filters.python",
            "typed_config": {
                "@type": "type.googleapis.com/xds.type.v3.TypedStruct",
                "type_url": "envoyx.filters.python",
                "value": {"module": "myfilters", "class": "AddHeader", "config": {"n": 1}},
            },
        },
    )
    load_bootstrap(document)


# -- Envoy's YAML reading --------------------------------------------------------------


def test_yaml_is_read_as_envoy_reads_it() -> None:
    text = """
!ignore defaults: &cluster_defaults {connect_timeout: 1s, type: STATIC}
static_resources:
  clusters:
  - <<: *cluster_defaults
    name: a
    ignore_health_on_host_removal: yes
    per_connection_buffer_limit_bytes: 0x8000
  - <<: *cluster_defaults
    name: 2024-01-01
"""
    clusters = load_bootstrap(text).static_resources.clusters
    assert clusters[0].ignore_health_on_host_removal is True
    assert clusters[0].per_connection_buffer_limit_bytes.value == 0x8000
    assert clusters[1].name == "2024-01-01"  # a plain scalar, not a date
    assert clusters[1].connect_timeout.seconds == 1


def test_invalid_yaml_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("static_resources:\n  clusters:\n  - name: a\n    type: [STATIC\n")
    (error,) = errors_of(path)
    assert error.startswith(f"{path}:5:1: invalid YAML")


def test_invalid_yaml_text_reports_line_and_column() -> None:
    (error,) = errors_of("admin:\n  address: x: y\n")
    assert error.startswith("<config>:2:13: invalid YAML: mapping values are not allowed here")


def test_invalid_json_file_reports_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "admin": {,}\n}\n')
    (error,) = errors_of(path)
    assert error.startswith(f"{path}:2:13: invalid JSON")


def test_empty_configuration_is_an_error() -> None:
    (error,) = errors_of("")
    assert "empty" in error


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    conf = tmp_path / "bootstrap.conf"
    conf.write_text("{}")
    (error,) = errors_of(conf)
    assert "unsupported configuration file extension '.conf'" in error
    (error,) = errors_of(tmp_path / "missing.yaml")
    assert "cannot read configuration file" in error


def test_other_message_types_are_rejected() -> None:
    from envoy.config.cluster.v3.cluster_pb2 import Cluster

    (error,) = errors_of(Cluster(name="c"))
    assert "expected a envoy.config.bootstrap.v3.Bootstrap message" in error


def test_no_source_at_all_is_an_error() -> None:
    (error,) = errors_of(None)
    assert "--config-yaml" in error


# -- schema errors, each with its path -------------------------------------------------


def test_unknown_field_at_depth_names_its_path() -> None:
    document = bootstrap_dict()
    hcm(document)["route_config"]["virtual_hosts"][0]["domainz"] = ["example.com"]
    errors = errors_of(document)
    assert errors == [
        f'{HCM_PATH}.route_config.virtual_hosts[0].domainz: unknown field "domainz" in '
        'envoy.config.route.v3.VirtualHost (did you mean "domains"?)'
    ]


def test_wrong_types() -> None:
    document = bootstrap_dict()
    cluster = document["static_resources"]["clusters"][0]
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]["port_value"] = "http"
    cluster["connect_timeout"] = 5
    hcm(document)["stat_prefix"] = ["a"]
    hcm(document)["route_config"]["virtual_hosts"][0]["domains"] = 7
    errors = errors_of(document)
    assert set(errors) == {
        f"{HCM_PATH}.stat_prefix: expected a string, got a list",
        # A single value for a repeated field is a list of it, as in Envoy.
        f"{HCM_PATH}.route_config.virtual_hosts[0].domains[0]: expected a string, got integer 7",
        'static_resources.clusters[0].connect_timeout: expected a duration string like "1.5s", '
        "got integer 5",
        "static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint"
        '.address.socket_address.port_value: expected an integer (uint32), got string "http"',
    }


def test_a_single_value_for_a_repeated_field_is_a_list_of_it() -> None:
    # Envoy 1.40 takes `domains: "*"` and `grpc_services: {...}` as one-element lists.
    document = bootstrap_dict()
    hcm(document)["route_config"]["virtual_hosts"][0]["domains"] = "*"
    bootstrap = load_bootstrap(document)
    manager = http_connection_manager_pb2.HttpConnectionManager()
    bootstrap.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert list(manager.route_config.virtual_hosts[0].domains) == ["*"]


def test_bad_enum_name_lists_the_choices() -> None:
    document = bootstrap_dict()
    document["static_resources"]["clusters"][0]["type"] = "STATIK"
    (error,) = errors_of(document)
    assert error == (
        'static_resources.clusters[0].type: invalid value string "STATIK" for enum '
        "envoy.config.cluster.v3.Cluster.DiscoveryType "
        "(one of: STATIC, STRICT_DNS, LOGICAL_DNS, EDS, ORIGINAL_DST)"
    )


def test_unknown_and_missing_type_urls() -> None:
    document = bootstrap_dict()
    hcm(document)["http_filters"][0]["typed_config"]["@type"] = "type.googleapis.com/acme.Router"
    hcm(document)["access_log"][0]["typed_config"] = {"path": "/dev/stdout"}
    errors = errors_of(document)
    assert set(errors) == {
        f'{HCM_PATH}.http_filters[0].typed_config: unknown @type "type.googleapis.com/acme.Router"',
        f'{HCM_PATH}.access_log[0].typed_config: missing "@type" (google.protobuf.Any)',
    }


def test_fields_inside_typed_config_are_checked() -> None:
    document = bootstrap_dict()
    hcm(document)["codec_type"] = "HTTP4"
    hcm(document)["http_filters"][0]["typed_config"]["dynamic_statz"] = True
    errors = sorted(errors_of(document))
    assert len(errors) == 2
    assert errors[0].startswith(f'{HCM_PATH}.codec_type: invalid value string "HTTP4"')
    assert errors[1].startswith(
        f'{HCM_PATH}.http_filters[0].typed_config.dynamic_statz: unknown field "dynamic_statz"'
    )


def test_typed_struct_with_known_type_url_is_checked_against_it() -> None:
    document = bootstrap_dict()
    hcm(document)["http_filters"][0]["typed_config"] = {
        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
        "type_url": ROUTER,
        "value": {"suppress_envoy_headerz": True},
    }
    (error,) = errors_of(document)
    assert error.startswith(
        f"{HCM_PATH}.http_filters[0].typed_config.value.suppress_envoy_headerz: unknown field"
    )


def test_two_members_of_one_oneof() -> None:
    document = bootstrap_dict()
    route = hcm(document)["route_config"]["virtual_hosts"][0]["routes"][0]
    route["redirect"] = {"path_redirect": "/elsewhere"}
    (error,) = errors_of(document)
    assert error.startswith(f"{HCM_PATH}.route_config.virtual_hosts[0].routes[0].redirect:")
    assert 'only one field of oneof "action"' in error


def test_same_field_under_two_spellings() -> None:
    document = bootstrap_dict()
    document["static_resources"]["clusters"][0]["connectTimeout"] = "2s"
    (error,) = errors_of(document)
    assert error == (
        'static_resources.clusters[0].connect_timeout: set twice, as "connect_timeout" '
        'and as "connectTimeout"'
    )


def test_every_error_of_the_document_is_reported_together() -> None:
    document = bootstrap_dict()
    document["statz_flush_interval"] = "5s"
    document["static_resources"]["clusters"][0]["type"] = "STATIK"
    document["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] = -1
    hcm(document)["route_config"]["virtual_hosts"][0]["domainz"] = []
    hcm(document)["http_filters"][0]["typed_config"]["@type"] = "type.googleapis.com/acme.Router"
    errors = errors_of(document)
    assert len(errors) == 5
    paths = sorted(error.split(": ", 1)[0] for error in errors)
    assert paths == sorted(
        [
            "statz_flush_interval",
            "static_resources.clusters[0].type",
            "static_resources.listeners[0].per_connection_buffer_limit_bytes",
            f"{HCM_PATH}.route_config.virtual_hosts[0].domainz",
            f"{HCM_PATH}.http_filters[0].typed_config",
        ]
    )
    # ConfigError's message carries them all, one per line; it is also a ValueError.
    with pytest.raises(ValueError, match="statz_flush_interval") as info:
        load_bootstrap(document)
    assert str(info.value).count("\n") == 4


def test_allow_unknown_fields_logs_instead(caplog: pytest.LogCaptureFixture) -> None:
    document = bootstrap_dict()
    document["static_resources"]["clusters"][0]["future_field"] = {"x": 1}
    bootstrap = load_bootstrap(document, allow_unknown_fields=True)
    assert bootstrap.static_resources.clusters[0].name == "backend"
    assert 'unknown field "future_field"' in caplog.text


# -- protoc-gen-validate rules ---------------------------------------------------------


def test_validation_rules_envoy_checks() -> None:
    document = bootstrap_dict()
    cluster = document["static_resources"]["clusters"][0]
    cluster["name"] = ""
    cluster["connect_timeout"] = "0s"
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]["port_value"] = 70000
    del hcm(document)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    del hcm(document)["stat_prefix"]
    errors = errors_of(document)
    routes = f"{HCM_PATH}.route_config.virtual_hosts[0].routes[0]"
    assert set(errors) == {
        "static_resources.clusters[0].name: value length must be at least 1 characters",
        "static_resources.clusters[0].connect_timeout: value must be greater than 0s",
        "static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint"
        ".address.socket_address.port_value: value must be less than or equal to 65535",
        f"{HCM_PATH}.stat_prefix: value length must be at least 1 characters",
        f'{routes}.action: value is required (set one of "route", "redirect", "direct_response", '
        '"filter_action", "non_forwarding_action")',
    }


def test_unique_items_rule() -> None:
    document = {
        "stats_config": {
            "histogram_bucket_settings": [{"match": {"exact": "rq"}, "buckets": [1, 5, 5]}]
        }
    }
    assert errors_of(document) == [
        "stats_config.histogram_bucket_settings[0].buckets: repeated value must contain unique "
        "items"
    ]


def test_validation_rules_apply_to_message_sources() -> None:
    bootstrap = load_bootstrap(BOOTSTRAP_YAML)
    bootstrap.static_resources.clusters[0].name = ""
    (error,) = errors_of(bootstrap)
    assert error == "static_resources.clusters[0].name: value length must be at least 1 characters"


def test_unknown_type_url_in_a_message_source() -> None:
    bootstrap = load_bootstrap(BOOTSTRAP_YAML)
    typed_config = bootstrap.static_resources.listeners[0].filter_chains[0].filters[0].typed_config
    typed_config.type_url = "type.googleapis.com/acme.Proxy"
    (error,) = errors_of(bootstrap)
    assert error == f'{HCM_PATH}: unknown @type "type.googleapis.com/acme.Proxy"'


# -- --config-yaml merge and node overrides --------------------------------------------


def test_config_yaml_is_merged_over_the_source_like_envoy(tmp_path: Path) -> None:
    path = tmp_path / "bootstrap.yaml"
    path.write_text(BOOTSTRAP_YAML)
    override = """
node: {id: node1}
admin: {address: {socket_address: {port_value: 9901}}}
static_resources:
  clusters:
  - name: extra
    connect_timeout: 1s
"""
    bootstrap = load_bootstrap(path, config_yaml=override)
    assert bootstrap.node.id == "node1"
    assert bootstrap.node.cluster == "edge"  # merged, not replaced
    assert bootstrap.admin.address.socket_address.port_value == 9901
    assert bootstrap.admin.address.socket_address.address == "127.0.0.1"
    assert [c.name for c in bootstrap.static_resources.clusters] == ["backend", "extra"]


def test_config_yaml_alone_and_its_errors() -> None:
    bootstrap = load_bootstrap(config_yaml="node: {id: only}")
    assert bootstrap.node.id == "only"
    errors = errors_of(BOOTSTRAP_YAML, config_yaml="node: {idd: x}")
    assert errors == [
        'node.idd: unknown field "idd" in envoy.config.core.v3.Node (did you mean "id"?) '
        "(in --config-yaml)"
    ]


def test_invalid_config_yaml_reports_line_and_column() -> None:
    assert errors_of(BOOTSTRAP_YAML, config_yaml="node: {id: [x}") == [
        "--config-yaml:1:14: invalid YAML: expected ',' or ']', but got '}'"
    ]


def test_merged_document_is_validated() -> None:
    # Rules run on the merged bootstrap (Envoy validates after MergeFrom), so the nameless
    # cluster of the override is reported at its merged position.
    errors = errors_of(
        BOOTSTRAP_YAML, config_yaml="static_resources: {clusters: [{connect_timeout: 1s}]}"
    )
    assert errors == [
        "static_resources.clusters[1].name: value length must be at least 1 characters"
    ]


def test_service_node_cluster_and_zone_override_the_node() -> None:
    bootstrap = load_bootstrap(
        BOOTSTRAP_YAML, service_node="n1", service_cluster="c1", service_zone="z1"
    )
    assert (bootstrap.node.id, bootstrap.node.cluster, bootstrap.node.locality.zone) == (
        "n1",
        "c1",
        "z1",
    )


def test_public_names() -> None:
    assert set(envoyx.__all__) == {
        "Server",
        "ConfigError",
        "EnvoyxError",
        "BindError",
        "XdsError",
        "load_bootstrap",
        "__version__",
    }
    assert issubclass(envoyx.ConfigError, envoyx.EnvoyxError)
    assert isinstance(envoyx.__version__, str)
