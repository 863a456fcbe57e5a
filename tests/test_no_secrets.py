"""No credential in the repository: every file git would commit (tracked, and new files not ignored) is scanned for
AWS access keys, private keys, password / secret assignments with a real value, and high-entropy strings.
.env.example holds placeholders only; the real values live in the git-ignored infra/docker/.env.
Each detector has a test that plants a secret (built at run time, so this file holds none) and sees it found.
"""

from __future__ import annotations

import math
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AWS_KEY = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
PRIVATE_KEY = re.compile(r"-----BEGIN (RSA |EC |DSA |OPENSSH |PGP |ENCRYPTED )?PRIVATE KEY( BLOCK)?-----")
# NAME = value / NAME: value, where NAME ends in password, secret, key or token; the value ends the line.
ASSIGNMENT = re.compile(r"""(?i)\b[\w.-]*(password|passwd|secret|secret_key|access_key|api_key|token)["']?\s*[:=]\s*"""
                        r"""["']?([^\s"'#,]{6,})["']?\s*,?\s*$""")
# Values that are not secrets: placeholders, references to where the secret comes from, test doubles.
PLACEHOLDER = re.compile(r"(?i)^(change-me|changeme|testing|example|placeholder|none|null|true|false|\.\.\.)$|"
                         r"[${}<>()\[\]]|^\w+(\.\w+)+$|^[A-Z_]+$")
TOKEN = re.compile(r"[A-Za-z0-9+/_=-]{32,}")


def entropy(text: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def high_entropy(token: str) -> bool:
    """A random-looking key: mixed case and digits, and more bits per character than words or hex digests have.
    AWS's documented example keys (with EXAMPLE in them) and alphabets (a run like abcdef) are not keys."""
    if "example" in token.lower() or any(run in token for run in ("abcdef", "ABCDEF", "012345")):
        return False
    return (any(c.islower() for c in token) and any(c.isupper() for c in token) and any(c.isdigit() for c in token)
            and entropy(token) > 4.6)


def findings(path: Path, text: str) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{path}:{number}"
        if any("EXAMPLE" not in key.group(0) for key in AWS_KEY.finditer(line)):
            found.append(f"{where}: AWS access key")
        if PRIVATE_KEY.search(line):
            found.append(f"{where}: private key")
        match = ASSIGNMENT.search(line)
        if match and not PLACEHOLDER.search(match.group(2)):
            found.append(f"{where}: {match.group(1)} assigned a value")
        found += [f"{where}: high-entropy string" for token in TOKEN.findall(line) if high_entropy(token)]
    return found


def committable_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return [REPO / name for name in listed if name and (REPO / name).is_file()]


def test_no_secret_in_the_files_git_would_commit() -> None:
    found = []
    for path in committable_files():
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        found += findings(path.relative_to(REPO), data.decode("utf-8", "replace"))
    assert found == []


def test_env_example_lists_every_variable_compose_needs_with_placeholders_only() -> None:
    compose = (REPO / "infra" / "docker" / "compose.yaml").read_text()
    needed = set(re.findall(r"\$\{(\w+)", compose))
    example = dict(line.split("=", 1) for line in (REPO / "infra" / "docker" / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert needed == set(example)
    assert all(value == "change-me" for key, value in example.items() if "USER" not in key)


@pytest.mark.parametrize("line, kind", [
    ("aws_access_key_id = " + "AKIA" + "Q3EGRV7ZJ2XK4M5N", "AWS access key"),
    ("-----BEGIN " + "OPENSSH PRIVATE KEY-----", "private key"),
    ("MINIO_ROOT_PASSWORD=" + "hunter2-prod", "PASSWORD assigned a value"),
    ('    "db_password": "' + 'Tr0ub4dor&3",', "password assigned a value"),
    ("api: " + "".join(["xK9#"[:3], "mQ2vL8pZ4rT7wB1nC6yH3jF5sD0gA"]), "high-entropy string"),
])
def test_a_planted_secret_is_found(line: str, kind: str) -> None:
    assert [f.split(": ", 1)[1] for f in findings(Path("planted.txt"), line)] == [kind]


@pytest.mark.parametrize("line", [
    "POSTGRES_PASSWORD=change-me",
    "MLFLOW_TRACKING_PASSWORD: ${MLFLOW_ADMIN_PASSWORD:?set it in infra/docker/.env}",
    'os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"',
    "secret_key = MLFLOW_FLASK_SERVER_SECRET_KEY.get()",
    "sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
])
def test_placeholders_and_references_are_not_secrets(line: str) -> None:
    assert findings(Path("ok.txt"), line) == []
