"""Reading policy files at git revisions, in a repository each test builds for itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from git_repo import git
from trace_dsl.errors import GitRevisionError, TraceError
from trace_dsl.versions.revisions import PolicyRef, checkout_policy_tree, read_source, rewrite_paths


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with two commits of policies/main.tp and its import, the first tagged v1."""
    root = tmp_path / "repo"
    (root / "policies" / "lib").mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    (root / "policies" / "main.tp").write_text('policy "p" version "1"\nimport "lib/shared.tp"\n', encoding="utf-8")
    (root / "policies" / "lib" / "shared.tp").write_text("let limit = 1\n", encoding="utf-8")
    (root / "README").write_text("not a policy\n", encoding="utf-8")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "v1")
    git(root, "tag", "v1")
    (root / "policies" / "main.tp").write_text('policy "p" version "2"\nimport "lib/shared.tp"\n', encoding="utf-8")
    (root / "policies" / "lib" / "shared.tp").write_text("let limit = 2\n", encoding="utf-8")
    git(root, "commit", "-q", "-am", "v2")
    (root / "policies" / "main.tp").write_text('policy "p" version "3"\nimport "lib/shared.tp"\n', encoding="utf-8")
    return root


def test_parse_plain_and_revision():
    assert PolicyRef.parse("a/b.tp") == PolicyRef(Path("a/b.tp"))
    assert PolicyRef.parse("a/b.tp@HEAD~1") == PolicyRef(Path("a/b.tp"), "HEAD~1")
    assert PolicyRef.parse("a@x/b.tp@v1.2") == PolicyRef(Path("a@x/b.tp"), "v1.2")
    assert str(PolicyRef.parse("b.tp@v1")) == "b.tp@v1"


def test_parse_existing_file_with_at(tmp_path: Path):
    odd = tmp_path / "policy@2.tp"
    odd.write_text("", encoding="utf-8")
    assert PolicyRef.parse(str(odd)).revision is None


def test_parse_empty_revision_rejected():
    with pytest.raises(GitRevisionError, match="PATH@REVISION"):
        PolicyRef.parse("policy.tp@")


def test_read_working_tree_and_revisions(repo: Path):
    path = repo / "policies" / "main.tp"
    assert 'version "3"' in read_source(PolicyRef(path))
    assert 'version "2"' in read_source(PolicyRef(path, "HEAD"))
    assert 'version "1"' in read_source(PolicyRef(path, "HEAD~1"))
    assert 'version "1"' in read_source(PolicyRef(path, "v1"))


def test_read_relative_path_from_subfolder(repo: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(repo / "policies")
    assert 'version "1"' in read_source(PolicyRef.parse("main.tp@v1"))


def test_checkout_resolves_imports_at_revision(repo: Path):
    with checkout_policy_tree(PolicyRef(repo / "policies" / "main.tp", "v1")) as path:
        assert 'version "1"' in path.read_text(encoding="utf-8")
        assert (path.parent / "lib" / "shared.tp").read_text(encoding="utf-8") == "let limit = 1\n"
        assert not (path.parent.parent / "README").exists()
        scratch = path
    assert not scratch.exists()


def test_checkout_working_tree_is_the_file(repo: Path):
    path = repo / "policies" / "main.tp"
    with checkout_policy_tree(PolicyRef(path)) as checked_out:
        assert checked_out == path


def test_unknown_revision_quotes_git(repo: Path):
    with pytest.raises(GitRevisionError) as info:
        read_source(PolicyRef(repo / "policies" / "main.tp", "v9"))
    message = str(info.value)
    assert "revision 'v9' not found" in message
    assert "fatal:" in message
    assert "git log --oneline" in message


def test_file_missing_at_revision(repo: Path):
    (repo / "policies" / "new.tp").write_text("", encoding="utf-8")
    with pytest.raises(GitRevisionError) as info:
        read_source(PolicyRef(repo / "policies" / "new.tp", "v1"))
    message = str(info.value)
    assert "policies/new.tp does not exist at v1" in message
    assert "fatal:" in message


def test_deleted_file_read_at_old_revision(repo: Path):
    git(repo, "rm", "-q", "-r", "-f", "policies")
    assert 'version "1"' in read_source(PolicyRef(repo / "policies" / "main.tp", "v1"))


def test_not_a_repository(tmp_path: Path):
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "p.tp").write_text("", encoding="utf-8")
    with pytest.raises(GitRevisionError) as info:
        read_source(PolicyRef(loose / "p.tp", "HEAD"))
    message = str(info.value)
    assert "not in a git repository" in message
    assert "drop '@HEAD'" in message


def test_missing_working_tree_file(tmp_path: Path):
    with pytest.raises(TraceError, match="policy file not found"):
        read_source(PolicyRef(tmp_path / "absent.tp"))


def test_rewrite_paths_names_revision(repo: Path):
    ref = PolicyRef(repo / "policies" / "main.tp", "v1")
    with checkout_policy_tree(ref) as path:
        message = f"{path}:2:8: error[TP100]: unknown name"
        assert rewrite_paths(message, path, ref) == "policies/main.tp@v1:2:8: error[TP100]: unknown name"
