"""docs/config-support.md's field index is the code's own list of supported fields.

Each field of each message a route configuration and a connection manager are made of
is set alone in a minimal bootstrap; the core either refuses it by its path ("not
supported by envoyx") or reads it. The document must list every field of these
messages, and say `rejected` exactly where the core refuses.
"""

from __future__ import annotations

import pytest

from support.config_fields import DOC, PLACES, Place, doc_list, fields_of, probe


@pytest.fixture(scope="module")
def listed() -> dict[str, dict[str, tuple[str, str]]]:
    return doc_list()


def test_the_index_covers_exactly_the_probed_messages(
    listed: dict[str, dict[str, tuple[str, str]]],
) -> None:
    assert sorted(listed) == sorted(place.message for place in PLACES)


@pytest.mark.parametrize("place", PLACES, ids=lambda p: p.message.rsplit(".", 2)[-1])
def test_the_document_says_what_the_code_does(
    place: Place, listed: dict[str, dict[str, tuple[str, str]]]
) -> None:
    documented = listed.get(place.message, {})
    fields = fields_of(place.message)
    names = [f.name for f in fields]
    assert sorted(documented) == sorted(names), (
        f"{DOC.name} must list every field of {place.message} (rerun "
        "`python -m tests.support.config_fields`)"
    )
    wrong = []
    for field in fields:
        actual = probe(place, field)
        status, note = documented[field.name]
        if (status == "rejected") != (actual == "rejected"):
            wrong.append(f"{field.name}: documented {status}, the core says {actual}")
        if status == "differs" and not note:
            wrong.append(f"{field.name}: `differs` needs a note saying how")
    assert not wrong, f"{place.message} in {DOC.name}:\n" + "\n".join(wrong)


def test_a_wrong_entry_is_caught() -> None:
    # The check above can fail: a field the core refuses, documented as supported.
    place = next(p for p in PLACES if p.message == "envoy.config.route.v3.RouteMatch")
    field = next(f for f in fields_of(place.message) if f.name == "dynamic_metadata")
    assert probe(place, field) == "rejected"
    supported = next(f for f in fields_of(place.message) if f.name == "prefix")
    assert probe(place, supported) == "supported"
