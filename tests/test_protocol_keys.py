"""No end of the federation spells a protocol key itself: each comes from fahr_core.protocol.

A key spelled twice can drift apart at one end and the other end then reads nothing, in another
process. So this parses every module of the server, the site, the researcher CLI and the process
launcher and fails on any string equal to a key of `fahr_core.protocol.keys` or of the model spec.
"""

from __future__ import annotations

from pathlib import Path

from fahr_core.protocol import keys
from fahr_core.protocol.spec import SPEC_KEYS
from tests.support import spelled_keys

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("server", "client", "research", "ops")

# Keys that are plain words, which the same modules also use for other things: event and report fields
# ("site", "metrics"), the privacy section of a site report ("epsilon", "delta"), pre-training logs
# ("steps"), checkpoint metadata ("arch", "finetune"). Their wire uses go through the constants too,
# but a string equal to one of them proves nothing, so they are not looked for.
PLAIN_WORDS = {"site", "metrics", "epsilon", "delta", "steps", "arch", "finetune"}


def protocol_keys() -> dict[str, str]:
    """key value -> where it is named."""
    found = {v: f"keys.{k}" for k, v in vars(keys).items() if k.isupper() and isinstance(v, str)}
    found.update({v: f"spec.SPEC_KEYS[{k!r}]" for k, v in SPEC_KEYS.items()})
    return found


def test_the_plain_words_left_out_are_protocol_keys():
    assert set(protocol_keys()) >= PLAIN_WORDS


def test_the_scan_finds_a_key_spelled_in_code_but_not_in_a_docstring():
    source = '"""Reads fahr-version."""\nx = config["fahr-version"]\ny = f"{a}/num-rounds"\n'
    assert spelled_keys(source, {"fahr-version", "num-rounds"}) == [(2, "fahr-version")]


def test_no_module_of_server_client_research_or_ops_spells_a_protocol_key():
    wanted = set(protocol_keys()) - PLAIN_WORDS
    files = [p for folder in SCANNED for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 20
    found = [
        f"{path.relative_to(ROOT)}:{line}: {key!r} (use fahr_core.protocol {protocol_keys()[key]})"
        for path in files
        for line, key in spelled_keys(path.read_text(), wanted)
    ]
    assert not found, "protocol keys spelled outside fahr_core.protocol:\n" + "\n".join(found)
