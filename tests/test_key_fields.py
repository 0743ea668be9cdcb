"""A key's fields are declared once, on keystore.KeyRecord: the bodies of `POST`/`PATCH /admin/keys`,
the options of `keys create`/`keys update` and the columns of `keys list` are made from it. These tests
fail when a field is declared without reaching each of them."""

from __future__ import annotations

import re

from tests.support.gateway import Backend, Gateway
from tests.support.processes import free_port
from vllm_gateway.keystore import Editable, KeyRecord, marked

# Each editable field: a value as the API takes it, as its CLI option's text (flags: the option alone),
# and as `keys list` shows it. A new editable field needs its line here.
SAMPLES: dict[str, tuple[object, str, str]] = {
    "name": ("sampled", "sampled", "sampled"),
    "admin": (True, "", "yes"),
    "models": (["sim", "other"], "sim,other", "sim,other"),
    "rate_limit": ("7/minute", "7/minute", "7/minute"),
    "token_limit": ("900/hour", "900/hour", "900/hour"),
    "weight": (2.5, "2.5", "2.5"),
    "max_parallel_requests": (3, "3", "3"),
    "expires_at": (1956528000.0, "2032-01-01", "2032-01-01 00:00 UTC"),
    "disabled": (True, "", "disabled"),
}
KEPT_BY_THE_STORE = {"id", "prefix", "hash", "created_at", "last_used_at", "previous_hash", "previous_until"}


def cli_options(fields: list[str], name: str) -> list[str]:
    """The samples as options, the key named `name` (names are unique)."""
    options = []
    for field in fields:
        flag = next(mark.flag for name, _, mark in marked(Editable) if name == field)
        options.append(flag or "--" + field.replace("_", "-"))
        if SAMPLES[field][1]:
            options.append(name if field == "name" else SAMPLES[field][1])
    return options


def test_every_key_field_is_editable_or_kept_by_the_store():

    editable = [name for name, _, _ in marked(Editable)]
    assert set(KeyRecord.model_fields) == set(editable) | KEPT_BY_THE_STORE
    assert set(editable) == set(SAMPLES)


def test_each_editable_field_is_set_over_the_api_and_the_cli_and_shown_by_keys_list(tmp_path):
    # Two models, never served: a key's model list may name only what the config has.
    never = [Backend(name, f"http://127.0.0.1:{free_port()}") for name in ("sim", "other")]
    with Gateway.start(tmp_path, never, wait_ready=False) as gateway:
        creatable = [name for name in SAMPLES if name != "disabled"]  # a key is created enabled
        with gateway.http(gateway.admin_key) as admin:
            created = admin.post("/admin/keys", json={name: SAMPLES[name][0] for name in creatable})
            plain = admin.post("/admin/keys", json={"name": "plain"}).json()
            changed = admin.patch(
                f"/admin/keys/{plain['id']}",
                json={name: value for name, (value, *_) in SAMPLES.items()} | {"name": "sampled-changed"},
            )
            refused = [
                admin.post("/admin/keys", json={"name": "x", name: {"not": "a value"}})
                for name in creatable
                if name != "name"
            ]
            refused += [admin.patch(f"/admin/keys/{plain['id']}", json={name: {"not": "a value"}}) for name in SAMPLES]
            # A field's own check is made on the request too, naming the field.
            out_of_range = {"name": "", "weight": 0, "max_parallel_requests": 0}
            refused += [
                admin.post("/admin/keys", json={"name": "x", **{name: value}}) for name, value in out_of_range.items()
            ]
            refused += [
                admin.patch(f"/admin/keys/{plain['id']}", json={name: value}) for name, value in out_of_range.items()
            ]
        made = gateway.create_key(*cli_options(creatable, "sampled-cli"))
        plain_too = gateway.create_key("--name", "plain-too")
        gateway.cli("keys", "revoke", "sampled")  # its name goes to the next
        updated = gateway.cli("keys", "update", str(plain_too["id"]), *cli_options(list(SAMPLES), "sampled")).stdout
        table = gateway.cli("keys", "list").stdout.splitlines()

    assert created.status_code == 201 and changed.status_code == 200
    renamed = {"name": "sampled-cli"}
    for name in creatable:
        assert (created.json()[name], made[name]) == (SAMPLES[name][0], renamed.get(name, SAMPLES[name][0])), name
    for name, (value, *_) in SAMPLES.items():
        value = "sampled-changed" if name == "name" else value
        assert changed.json()[name] == value and plain[name] != value, name
    refused_params = [(response.status_code, response.json()["error"]["param"]) for response in refused]
    expected = [n for n in creatable if n != "name"] + list(SAMPLES) + list(out_of_range) + list(out_of_range)
    assert refused_params == [(400, name) for name in expected]

    header = re.split(r" {2,}", table[0])
    cells = re.split(r" {2,}", next(line for line in table if line.startswith(str(plain_too["id"]))))
    row = dict(zip(header, cells, strict=True))
    assert re.split(r" {2,}", updated.strip()) == cells[:-2]  # `keys update` prints the row less the usage
    headings = {"max_parallel_requests": "PARALLEL", "disabled": "STATE", "expires_at": "EXPIRES"}
    for name, (_, _, shown) in SAMPLES.items():
        assert row[headings.get(name, name.upper().replace("_", " "))] == shown, name
