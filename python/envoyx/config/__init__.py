"""Load and validate Envoy v3 bootstrap documents.

A bootstrap arrives as a file path (``.yaml``/``.yml``/``.json``/``.pb_text``/``.pb``), as
YAML or JSON text, as a dict, or as an ``envoy.config.bootstrap.v3.Bootstrap`` message. It is
checked against Envoy's own schema (the generated classes of ``xds-protos``) in two passes,
each of which reports every problem of the document together, each naming its field path:

1. the proto-JSON schema: unknown fields, wrong types, bad enum names, unknown ``@type``s,
   malformed durations, two members of one oneof (what ``json_format.ParseDict`` would
   reject, but without stopping at the first error);
2. the protoc-gen-validate rules Envoy checks once the document has parsed (required
   fields, string lengths, numeric ranges, ...), inside ``typed_config`` Anys too.

YAML is read as Envoy reads it (yaml-cpp then ``parseYamlNode``): ``yes``/``on``/``y`` are
booleans, ``010`` is octal, dates stay strings, keys tagged ``!ignore`` are dropped.

:func:`bootstrap_to_json` gives the canonical proto-JSON handed to the Rust core.

The names below are the public API. The submodules are envoyx's internal API, shared
with :mod:`envoyx.xds` (which checks xDS and ``Server.update`` resources the same way):

- :mod:`envoyx.config.loading`: sources, files, YAML as Envoy reads it, JSON;
  :func:`load_bootstrap`, :func:`bootstrap_to_json`;
- :mod:`envoyx.config.schema`: pass 1, the schema walk, and descriptor helpers;
- :mod:`envoyx.config.rules`: pass 2, the protoc-gen-validate rules.
"""

from __future__ import annotations

from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap

from envoyx.config.loading import BootstrapSource, bootstrap_to_json, load_bootstrap

__all__ = [
    "Bootstrap",
    "BootstrapSource",
    "bootstrap_to_json",
    "load_bootstrap",
]
