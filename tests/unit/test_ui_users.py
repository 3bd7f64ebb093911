"""The chat UI's users file (ui/ui_users.py: scrypt hashes, never passwords) and the environment
`ernie-mesh up` gives the UI when login is on (MeshPlan.ui_env)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from agent.local.plan import REPO_DIR, MeshPlan

SCRIPT = REPO_DIR / "ui" / "ui_users.py"
_spec = importlib.util.spec_from_file_location("ui_users", SCRIPT)
assert _spec and _spec.loader
ui_users = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ui_users)


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], input=stdin, capture_output=True, text=True)


def test_a_hash_checks_its_password_only_and_is_salted():
    a, b = ui_users.hash_password("correct horse"), ui_users.hash_password("correct horse")
    assert a != b and "correct horse" not in a
    assert ui_users.verify_password("correct horse", a) and ui_users.verify_password("correct horse", b)
    assert not ui_users.verify_password("correct hors", a)
    users = {"alice": a}
    assert ui_users.check(users, "alice", "correct horse")
    assert not ui_users.check(users, "alice", "wrong")
    assert not ui_users.check(users, "bob", "correct horse")


def test_add_remove_and_the_file_s_mode(tmp_path: Path):
    users = tmp_path / "ui-users"
    assert run("add", str(users), "alice", "--stdin", stdin="first password\n").returncode == 0
    assert run("add", str(users), "bob", "--stdin", stdin="second password\n").returncode == 0
    assert users.stat().st_mode & 0o777 == 0o600
    loaded = ui_users.load_users(users)
    assert set(loaded) == {"alice", "bob"} and "first password" not in users.read_text()
    assert ui_users.check(loaded, "bob", "second password")
    assert run("add", str(users), "alice", "--stdin", stdin="a new password\n").returncode == 0  # a new password
    assert ui_users.check(ui_users.load_users(users), "alice", "a new password")
    assert run("remove", str(users), "bob").returncode == 0
    assert set(ui_users.load_users(users)) == {"alice"}
    out = run("remove", str(users), "bob")
    assert out.returncode != 0 and "no user 'bob'" in out.stderr
    short = run("add", str(users), "carol", "--stdin", stdin="short\n")
    assert short.returncode != 0 and "at least 8 characters" in short.stderr
    printed = run("hash", stdin="from a pipe 123\n")
    assert printed.returncode == 0 and ui_users.verify_password("from a pipe 123", printed.stdout.strip())


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("alice\n", ":1: expected name:hash"),
        ("# a comment\n\nalice:plain-password\n", ":3: not a scrypt"),
        ("alice:scrypt$1000$8$1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==\n", ":1: hash parameters out of range"),
        ("alice:scrypt$16384$8$1$!!$AAAA\n", ":1: malformed hash"),
        ("bad name:scrypt$16384$8$1$AAAA$AAAA\n", ":1: expected name:hash"),
        ("# nobody\n", "no user in the UI users file"),
    ],
)
def test_a_bad_users_file_names_its_line(tmp_path: Path, text: str, error: str):
    users = tmp_path / "ui-users"
    users.write_text(text)
    with pytest.raises(ui_users.UsersFileError, match=error.replace("$", r"\$")) as e:
        ui_users.load_users(users)
    assert str(users) in str(e.value)


def test_a_user_listed_twice_is_an_error(tmp_path: Path):
    h = ui_users.hash_password("whatever 123")
    users = tmp_path / "ui-users"
    users.write_text(f"alice:{h}\nalice:{h}\n")
    with pytest.raises(ui_users.UsersFileError, match=":2: user 'alice' is listed twice"):
        ui_users.load_users(users)


def test_up_gives_the_ui_an_absolute_users_file_and_a_secret_derived_from_its_key(tmp_path, monkeypatch):
    plan = MeshPlan(run_dir=tmp_path)
    plan.api_key_path.write_text("sk-local-key\n")
    monkeypatch.delenv("CHAINLIT_AUTH_SECRET", raising=False)
    monkeypatch.delenv("ERNIE_MESH_UI_USERS", raising=False)
    assert "CHAINLIT_AUTH_SECRET" not in plan.ui_env() and "ERNIE_MESH_UI_USERS" not in plan.ui_env()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ERNIE_MESH_UI_USERS", "ui-users")
    env = plan.ui_env()
    assert env["ERNIE_MESH_UI_USERS"] == str(tmp_path / "ui-users")  # the UI runs in ui/: made absolute
    secret = env["CHAINLIT_AUTH_SECRET"]
    assert len(secret) >= 32 and "sk-local-key" not in secret
    assert MeshPlan(run_dir=tmp_path).ui_env()["CHAINLIT_AUTH_SECRET"] == secret  # the next `up`: the same
    plan.api_key_path.write_text("sk-another-key\n")
    assert plan.ui_env()["CHAINLIT_AUTH_SECRET"] != secret
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", "x" * 40)  # the operator's own: left to the environment
    assert "CHAINLIT_AUTH_SECRET" not in plan.ui_env()
