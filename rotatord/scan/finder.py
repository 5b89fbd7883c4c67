"""Find rotatord credentials in raw bytes (a log, a source file, a core dump).

Three shapes are looked for, each confirmed before it becomes a :class:`Candidate`:

- API tokens (``<prefix>_<43 base62><6 checksum>``): the checksum confirms them, so a token
  found here is a rotatord token whether or not a managed secret knows it.  The prefix is taken
  from the lowercase run before ``_``, trying each suffix of that run, so a token glued to other
  text (``x=3Ddemo_...`` in a URL-encoded log) is still found.
- Fernet keys (44 characters of urlsafe base64 encoding 32 bytes, canonically): random base64
  has the same shape, so these are only candidates; the caller reports one only when it is a key
  of a managed secret.
- Standard Webhooks secrets (``whsec_`` + base64 of 24..64 bytes): other systems use the same
  prefix, so these too are reported only when a managed secret holds them.

Work is on bytes, so binary files need no decoding, and the material stays in a
:class:`~rotatord.sensitive.Sensitive` wrapper: a Candidate's repr shows its fingerprint only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from ..crypto.generators import FernetGenerator, WebhookSecretGenerator
from ..crypto.tokens import BODY_WIDTH, CHECKSUM_WIDTH, fingerprint, parse_token

__all__ = ["Candidate", "CandidateKind", "find_candidates"]

CandidateKind = Literal["api_token", "fernet", "webhook_secret"]

# The body and checksum of a token after its "_", not glued to more base62 on the right.
_TOKEN_TAIL = re.compile(rb"_([0-9A-Za-z]{%d})(?![0-9A-Za-z])" % (BODY_WIDTH + CHECKSUM_WIDTH))
_PREFIX_RUN = re.compile(rb"[a-z0-9]{1,16}\Z")
_FERNET = re.compile(rb"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}=(?![A-Za-z0-9_=-])")
_WHSEC = re.compile(rb"whsec_[A-Za-z0-9+/]{32,88}={0,2}(?![A-Za-z0-9+/=])")
_FERNET_CHECK = FernetGenerator()
_WHSEC_CHECK = WebhookSecretGenerator()


@dataclass(frozen=True)
class Candidate:
    """One confirmed shape at ``offset`` (bytes) on ``line`` (from 1).  ``material`` is secret."""

    kind: CandidateKind
    offset: int
    line: int
    material: str
    #: The token's public prefix (api_token), else None.
    prefix: str | None = None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.material)

    def __repr__(self) -> str:
        # The material never reaches a repr; the fingerprint names it well enough.
        return f"Candidate(kind={self.kind!r}, line={self.line}, fingerprint={self.fingerprint!r})"


def _tokens(data: bytes) -> Iterator[tuple[int, str, str]]:
    for match in _TOKEN_TAIL.finditer(data):
        start = match.start()
        run = _PREFIX_RUN.search(data, max(0, start - 16), start)
        if run is None:
            continue
        tail = match.group(0).decode("ascii")
        text = run.group(0).decode("ascii")
        # Longest prefix first: a token's own prefix is at most 16 characters and starts with a letter.
        for i in range(len(text) - 1):
            if not text[i].isalpha():
                continue
            token = text[i:] + tail
            parts = parse_token(token)
            if parts is not None:
                yield run.start() + i, token, parts.prefix
                break


def _fernet_keys(data: bytes) -> Iterator[tuple[int, str]]:
    for match in _FERNET.finditer(data):
        text = match.group(0).decode("ascii")
        if _FERNET_CHECK.recognises(text):
            yield match.start(), text


def _webhook_secrets(data: bytes) -> Iterator[tuple[int, str]]:
    for match in _WHSEC.finditer(data):
        text = match.group(0).decode("ascii")
        if _WHSEC_CHECK.recognises(text):
            yield match.start(), text


def find_candidates(data: bytes) -> list[Candidate]:
    """Every confirmed token and every key-shaped candidate in ``data``, in file order."""
    found: list[tuple[int, CandidateKind, str, str | None]] = []
    found += [(off, "api_token", token, prefix) for off, token, prefix in _tokens(data)]
    found += [(off, "fernet", key, None) for off, key in _fernet_keys(data)]
    found += [(off, "webhook_secret", secret, None) for off, secret in _webhook_secrets(data)]
    found.sort(key=lambda item: item[0])
    out: list[Candidate] = []
    line, counted = 1, 0
    for offset, kind, material, prefix in found:
        line += data.count(b"\n", counted, offset)
        counted = offset
        out.append(Candidate(kind, offset, line, material, prefix))
    return out
